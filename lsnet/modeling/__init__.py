"""The LSNet network (paper §3): backbone + FPN + two-stage landmark head, and its losses."""
from lsnet.modeling.config import LossConfig, ModelConfig, TestConfig
from lsnet.modeling.detector import LSNet, build_model, compute_losses
from lsnet.modeling.head import HeadOutputs

__all__ = ["HeadOutputs", "LSNet", "LossConfig", "ModelConfig", "TestConfig", "build_model", "compute_losses"]
