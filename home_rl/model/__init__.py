"""The HOME model: hybrid MLP experts, the router, upcycling, expert views and checkpoints."""
from home_rl.model.architectures import SUPPORTED
from home_rl.model.home import HomeModel, is_home_checkpoint, view_name
from home_rl.experts import EXPERTS, FAST, THINK
from home_rl.model.hybrid_mlp import HybridMLP
from home_rl.model.router import Router
from home_rl.model.upcycle import DTYPES, load_dense, upcycle

__all__ = ["HomeModel", "HybridMLP", "Router", "EXPERTS", "FAST", "THINK", "SUPPORTED", "DTYPES",
           "view_name", "is_home_checkpoint", "load_dense", "upcycle"]
