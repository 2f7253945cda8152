"""Box-prompted masks with SAM (transformers ``SamModel``): one mask per box, the best of three.

SAM answers every box prompt with three candidate masks and a predicted IoU for each; the one
with the highest predicted IoU is kept ("best-of-multimask"). Any ``SamModel`` checkpoint works:
``facebook/sam-vit-base`` (about 94 M parameters) or the pruned ``Zigeng/SlimSAM-uniform-77``
(about 9 M) are the practical ones on a CPU. MobileSAM's TinyViT encoder is not a transformers
architecture; SlimSAM is the light option here.

Weights come from ``SAM_MODEL``: a local folder (``save_pretrained`` layout) or a Hugging Face id
already in the local cache. Nothing is downloaded at run time (see :func:`resolve_pretrained`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

BOX_CHUNK = 32  # boxes per SAM decoder call (memory stays flat for crowded images)


class ModelNotAvailable(RuntimeError):
    """The configured weights are neither a local folder nor in the local Hugging Face cache."""


def resolve_pretrained(name_or_path: str, env_name: str) -> str:
    """A local folder for ``name_or_path``: the folder itself, or the cached snapshot of a hub id.

    Never downloads: a hub id resolves only from an existing cache (``local_files_only``), and
    ``HF_HUB_OFFLINE=1`` is set for whatever transformers does next.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not name_or_path:
        raise ModelNotAvailable(f"{env_name} is empty")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"{env_name}={name_or_path!r} is a folder without config.json (not a save_pretrained folder)")
        return str(path)
    if path.suffix or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotAvailable(f"{env_name}={name_or_path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download  # heavy: huggingface_hub, only to resolve a hub id

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as exc:
        raise ModelNotAvailable(
            f"{env_name}={name_or_path!r} is not a local folder and not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME') or '~/.cache/huggingface'}). Weights are never downloaded at run time: "
            f"fetch them once where there is network (`hf download {name_or_path}`), copy the folder here and "
            f"set {env_name} to its path. ({type(exc).__name__})"
        ) from None


def set_torch_threads(threads: int = 0) -> None:
    import torch  # heavy: torch, imported only when a model is loaded

    torch.set_num_threads(max(1, threads or os.cpu_count() or 1))


class BoxSegmenter:
    """A loaded SAM: ``segment(image, boxes)`` -> full-size boolean masks and their predicted IoU."""

    def __init__(self, name_or_path: str, device: str = "cpu", threads: int = 0):
        path = resolve_pretrained(name_or_path, "SAM_MODEL")
        import torch  # noqa: F401  (transformers needs it; imported here to keep module import light)
        from transformers import SamModel, SamProcessor  # heavy: transformers, only when SAM loads
        from transformers.utils import logging as hf_logging  # heavy: with transformers above

        hf_logging.disable_progress_bar()
        self.name = name_or_path
        self.device = device
        self.processor = SamProcessor.from_pretrained(path, local_files_only=True)
        self.model = SamModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self._lock = threading.Lock()
        set_torch_threads(threads)

    @property
    def model_name(self) -> str:
        return Path(self.name).name or self.name

    def segment(self, image: Image.Image, xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(masks (N, H, W) bool, predicted_iou (N,))`` for pixel boxes ``xyxy`` on ``image``."""
        import torch  # heavy: torch, imported only when a model is loaded

        width, height = image.size
        boxes = np.asarray(xyxy, dtype=float).reshape(-1, 4)
        if not len(boxes):
            return np.zeros((0, height, width), dtype=bool), np.zeros(0)
        masks: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        with self._lock, torch.no_grad():
            # The image embedding is computed once; each chunk of boxes reuses it.
            inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"])
            for start in range(0, len(boxes), BOX_CHUNK):
                chunk = boxes[start:start + BOX_CHUNK]
                prompt = self.processor(images=image.convert("RGB"), input_boxes=[chunk.tolist()],
                                        return_tensors="pt").to(self.device)
                out = self.model(image_embeddings=embeddings, input_boxes=prompt["input_boxes"], multimask_output=True)
                iou = out.iou_scores[0]  # (n, 3): SAM's own estimate of each candidate's IoU
                best = iou.argmax(dim=-1)
                rows = torch.arange(len(chunk))
                chosen = out.pred_masks[0][rows, best][:, None]  # (n, 1, h, w) low-res logits
                full = self.processor.post_process_masks([chosen.cpu()], prompt["original_sizes"].cpu(),
                                                         prompt["reshaped_input_sizes"].cpu())[0]
                masks.append(full[:, 0].numpy().astype(bool))
                scores.append(iou[rows, best].float().cpu().numpy())
        return np.concatenate(masks), np.concatenate(scores)
