"""What Kubernetes gives each pod of a generated manifest: moved to `workloads.k8s_pods` (the
link-down fault of `python -m benchmarks.faults` runs such pods too); its names stay
importable from here."""

from workloads.k8s_pods import (  # noqa: F401
    CONTROLLER_LABELS,
    OWNER_UID,
    TRAINER_NODE,
    TRAINER_STEP_LABEL,
    TrainerPod,
    dns_names,
    expand,
    kubernetes_env,
    pod_argv,
    pod_spec,
    trainer_v2_pods,
)
