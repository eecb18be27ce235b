"""Launchers for disttrain jobs: `launch.local` (one machine) and `launch.k8s` (Kubernetes).

Nothing in this package imports TensorFlow.
"""
