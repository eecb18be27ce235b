"""Reference training workloads shared by tests/ and benchmarks/, which never import each other.

Each module imports only disttrain, launch and the libraries they use, so that a test and a
benchmark run the same job: `fault_training` (fault injection, bad input), `text_classification`
(keras-io's Transformer text classifier, sparse gradients).
"""
