from .backbone import BackboneOutput, MoReBackbone
from .gcr import GCR
from .heads import LargeFOV, classifier_cam, classifier_logits, tokens_to_map
from .network import MoReNet, MoReOutput

__all__ = ["BackboneOutput", "MoReBackbone", "GCR", "LargeFOV", "classifier_cam", "classifier_logits",
           "tokens_to_map", "MoReNet", "MoReOutput"]
