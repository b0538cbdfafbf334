"""MST networks: the timm ViT backbone with a mask token, the DINO head, the global image decoder,
and the student/teacher pair that runs Algorithm 1."""

from mst_ds.model.backbone import Backbone, BackboneOutput
from mst_ds.model.decoder import GlobalImageDecoder
from mst_ds.model.heads import DINOHead
from mst_ds.model.mst import MSTModel, Teacher, TeacherOutput, attention_entropy

__all__ = [
    "Backbone",
    "BackboneOutput",
    "DINOHead",
    "GlobalImageDecoder",
    "MSTModel",
    "Teacher",
    "TeacherOutput",
    "attention_entropy",
]
