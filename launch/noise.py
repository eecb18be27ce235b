"""The known-harmless lines TensorFlow prints at start-up, which the launcher hides.

TensorFlow's C++ logging writes a few lines to stderr before it reads
`TF_CPP_MIN_LOG_LEVEL` (absl logs everything until `absl::InitializeLog()`), so
even at the launcher's default level 2 every worker starts with lines like
`E0000 ... cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)`,
and an `E` line reads like a failure. On a machine without a GPU driver they say
nothing: TensorFlow runs on the CPU, as it should.

Only lines matching one of `KNOWN_HARMLESS` exactly (the glog prefix, the source
file and the whole message) are hidden; anything else, including other CUDA
errors, still shows. Hidden lines still reach `--log-dir` and a failing worker's
stderr tail; `python -m launch.local --show-all` shows them.
"""

from __future__ import annotations

import re

# absl/glog prefix: severity and date, time, thread id, then `file.cc:LINE] `.
_GLOG = r"[IWEF]\d{4} [\d:.]+ +\d+ "

KNOWN_HARMLESS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (why, re.compile(pattern)) for why, pattern in (
        ("absl announces that it logs to stderr until initialised",
         r"WARNING: All log messages before absl::InitializeLog\(\) is called are written "
         r"to STDERR"),
        ("oneDNN is on (TF_ENABLE_ONEDNN_OPTS=0 turns it off)",
         _GLOG + r"port\.cc:\d+\] oneDNN custom operations are on\. You may see slightly "
         r"different numerical results due to floating-point round-off errors from different "
         r"computation orders\. To turn them off, set the environment variable "
         r"`TF_ENABLE_ONEDNN_OPTS=0`\."),
        ("no GPU driver on this machine: TensorFlow uses the CPU",
         _GLOG + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will "
         r"not be used\."),
        ("no GPU driver on this machine (CUDA's error 303: the driver library is missing); "
         "other cuInit errors still show",
         _GLOG + r"cuda_(?:platform|executor|diagnostics)\.cc:\d+\] failed call to cuInit: "
         r"(?:INTERNAL: CUDA error: Failed call to cuInit: )?UNKNOWN ERROR \(303\)"),
        ("the CPU has instructions this TensorFlow build does not use",
         _GLOG + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use "
         r"available CPU instructions in performance-critical operations\."),
        ("the second line of the CPU instructions message",
         r"To enable the following instructions: [A-Za-z0-9_., ]+, in other operations, "
         r"rebuild TensorFlow with the appropriate compiler flags\."),
        ("GPU builds register their CUDA plugins twice",
         _GLOG + r"cuda_(?:dnn|fft|blas)\.cc:\d+\] Unable to register (?:cuDNN|cuFFT|cuBLAS) "
         r"factory: Attempting to register factory for plugin (?:cuDNN|cuFFT|cuBLAS) when one "
         r"has already been registered"),
        ("GPU builds register the computation placer twice",
         _GLOG + r"[\w]+\.cc:\d+\] computation placer already registered\. Please check "
         r"linkage and avoid linking the same target more than once\."),
        ("TensorRT, an optional GPU inference library, is not installed",
         _GLOG + r"py_utils\.cc:\d+\] TF-TRT Warning: Could not find TensorRT"),
    )
)
"""(why it is harmless, the pattern a whole line must match)."""


def is_known_harmless(line: str) -> bool:
    """Whether `line` (without its line ending) is one of `KNOWN_HARMLESS`.

    >>> is_known_harmless("I0000 00:00:1796181008.418448   21722 cudart_stub.cc:31] "
    ...                   "Could not find cuda drivers on your machine, GPU will not be used.")
    True
    >>> is_known_harmless("E0000 00:00:1.0  7 cuda_platform.cc:52] failed call to cuInit: "
    ...                   "CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected")
    False
    """
    text = line.rstrip()
    return any(pattern.fullmatch(text) for _, pattern in KNOWN_HARMLESS)
