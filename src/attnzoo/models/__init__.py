"""Networks built from attnzoo mechanisms: ResNets with any gating module, seq2seq, captioning."""

from __future__ import annotations

# Imported eagerly: the submodule attnzoo.models.resnet and the function resnet share a name, and
# binding the function here, after the submodule is loaded, keeps attnzoo.models.resnet callable.
from attnzoo.models.captioner import ShowAttendTellCaptioner
from attnzoo.models.resnet import ResNet, resnet
from attnzoo.models.san import SAN, san
from attnzoo.models.segmentation import SegmentationNet
from attnzoo.models.seq2seq import Seq2Seq

__all__ = ["SAN", "ResNet", "SegmentationNet", "Seq2Seq", "ShowAttendTellCaptioner", "resnet", "san"]
