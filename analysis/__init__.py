"""Weight-space and function-space comparison of LoRA updates (protocol.md section 4).

Geometry reads PEFT adapter directories directly (no model needed); LMC and CKA run the engine model
with a combined adapter. Metrics schema: docs/analysis.md.
"""
from .adapters import AdapterSet, load_adapters
from .cka import linear_cka, minibatch_cka
from .geometry import Geometry, compute_geometry, summarize
from .linalg import cosine, effective_rank, factored_svd, principal_angles
from .run import REPORT_DIR, run_analysis
from .stats import mcnemar

__all__ = ["AdapterSet", "load_adapters", "linear_cka", "minibatch_cka", "Geometry", "compute_geometry",
           "summarize", "cosine", "effective_rank", "factored_svd", "principal_angles", "REPORT_DIR",
           "run_analysis", "mcnemar"]
