"""Tiny randomly initialised models (YOLO, OWL-ViT / OWLv2, SAM) for tests that need a loadable model but no trained one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def make_checkpoint(path: Path, names: Sequence[str], cfg: str = "yolov8n.yaml", seed: int = 0) -> Path:
    """A randomly initialised detector with ``names`` as classes, saved as an Ultralytics .pt."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = YOLO(cfg)
    model.model = DetectionModel(cfg, nc=len(names), verbose=False)
    model.model.names = {i: n for i, n in enumerate(names)}
    model.model.args = {"imgsz": 64}
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def _tokenizer():
    """A character-level CLIP tokenizer; special tokens last, as in CLIP (OWL-ViT masks queries starting with id 0)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab.setdefault(char + suffix, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16), vocab


def make_tiny_owl(path: Path, kind: str = "owlv2", image_size: int = 64, seed: int = 0) -> Path:
    """A randomly initialised OWLv2 (or OWL-ViT with ``kind="owlvit"``) saved with its processor."""
    import torch
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    tokenizer, vocab = _tokenizer()
    # A small initializer keeps the random box head near its per-patch prior (unsaturated boxes and scores).
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"], "initializer_factor": 0.1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 16, "initializer_factor": 0.1}
    torch.manual_seed(seed)
    size = {"height": image_size, "width": image_size}
    if kind == "owlv2":
        config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32, initializer_factor=0.1)
        model = Owlv2ForObjectDetection(config)
        processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size=size), tokenizer=tokenizer)
    else:
        config = OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32, initializer_factor=0.1)
        model = OwlViTForObjectDetection(config)
        processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_tiny_sam(path: Path, seed: int = 0) -> Path:
    """A randomly initialised SamModel (64 px input) saved with its processor."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    vision = {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
              "patch_size": 8, "window_size": 4, "global_attn_indexes": [1], "num_pos_feats": 16, "mlp_dim": 64}
    prompt = {"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 4}
    decoder = {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "iou_head_hidden_dim": 32}
    torch.manual_seed(seed)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
