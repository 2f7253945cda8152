"""All configuration, read once from the environment into one typed object.

Every knob of the service and the worker lives here so the README's configuration table and the
code cannot drift apart: ``python -m backend.core.settings`` prints the table this file defines.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.core import prelabel_policy
from backend.core.ultralytics_env import EXPORT_FORMATS

#: How the placeholders of .env.example begin; a secret that still starts so is refused at start.
PLACEHOLDER_PREFIX = "replace-with-"


class Settings(BaseSettings):
    """Service and worker settings. Field descriptions double as documentation."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # --- infrastructure -------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for queues, cache, registry pointer and pub/sub.")
    model_dir: Path = Field(Path("var/models"), description="Promoted YOLO checkpoints (shared storage when scaled out).")
    data_dir: Path = Field(Path("var/data"), description="Image cache and training datasets.")
    log_level: str = Field("INFO", description="Python logging level.")

    # --- Label Studio ---------------------------------------------------------------------------
    label_studio_url: str = Field("", description="Base URL of Label Studio, e.g. http://127.0.0.1:8080.")
    label_studio_api_key: SecretStr = Field(
        SecretStr(""),
        description="Personal Access Token (or legacy token) of a Label Studio user.",
    )

    # --- auth -----------------------------------------------------------------------------------
    basic_auth_user: str = Field(
        "",
        description=("If set with BASIC_AUTH_PASS, HTTP Basic auth; with it or WEBHOOK_SECRET set, every route except "
                     "/health and /openapi.json needs one of them (README, Routes)."),
    )
    basic_auth_pass: SecretStr = Field(SecretStr(""), description="Password for BASIC_AUTH_USER.")
    webhook_secret: SecretStr = Field(
        SecretStr(""),
        description=("Shared secret (header X-Webhook-Secret or ?token=) for Label Studio's event webhooks; opens every "
                     "route Basic auth opens. The .env.example placeholder is refused. Both empty = every route open "
                     "(logged as a warning)."),
    )

    # --- Gemini ---------------------------------------------------------------------------------
    gemini_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        description=("Gemini API key (GEMINI_API_KEY or GOOGLE_API_KEY). "
                     "Empty = Gemini off unless GOOGLE_GENAI_USE_VERTEXAI is set."),
    )
    google_genai_use_vertexai: bool = Field(
        False,
        description="Use Vertex AI (the SDK's own switch; also needs GOOGLE_CLOUD_PROJECT/LOCATION).",
    )
    gemini_model: str = Field("gemini-2.5-flash", description="Gemini model id.")
    gemini_base_url: str = Field("", description="Override the Gemini endpoint (proxies, the tests' fake server).")
    gemini_api_version: str = Field("", description="API version (v1, v1beta); empty = the SDK's default.")
    gemini_timeout: float = Field(20.0, description="Seconds for one Gemini call.")
    gemini_task_deadline: float = Field(
        30.0,
        description="Seconds one task may spend on Gemini, retries included, before falling back.",
    )
    gemini_concurrency: int = Field(
        16, ge=1,
        description="Gemini calls in flight at once for one request or job (paid-tier rate limits allow far more).",
    )
    gemini_max_objects: int = Field(25, ge=1, description="Object cap asked of Gemini and enforced on its answer.")
    gemini_max_image_side: int = Field(1024, ge=64, description="Images are downscaled to this long side before sending.")
    gemini_temperature: float = Field(0.5, description="Sampling temperature.")
    gemini_max_output_tokens: int = Field(8192, description="Output token cap per call.")
    gemini_price_input_per_m: float = Field(0.30, description="USD per 1M input tokens (cost estimate).")
    gemini_price_output_per_m: float = Field(2.50, description="USD per 1M output tokens, thinking included.")
    gemini_daily_budget_usd: float = Field(
        5.0, ge=0,
        description="Skip Gemini for the rest of the UTC day once this many USD are spent (YOLO serves). 0 = no budget.",
    )
    prompt_max_chars: int = Field(
        500, ge=1,
        description=("Longest free text put into a Gemini prompt: each label's hint and the interactive query "
                     "(params.context) are cut to this many characters."),
    )
    gemini_breaker_failures: int = Field(5, ge=1, description="Consecutive failed tasks that open the circuit breaker.")
    gemini_breaker_cooldown: float = Field(60.0, description="Seconds the breaker stays open before Gemini is tried again.")
    gemini_cache_ttl: int = Field(30 * 24 * 3600, description="Seconds a Gemini answer stays cached in Redis.")
    gemini_rpm: int = Field(0, ge=0, description="Requests per minute for background pre-labeling (0 = unlimited).")
    gemini_bulk_tier: Literal["standard", "flex", "batch"] = Field(
        "standard",
        description=("Gemini tier of bulk drafting (pre-labeling on import, POST /prelabel, lsb detect/push); "
                     "/predict always uses standard. flex: the cheaper, slower synchronous tier; batch: the Batch API "
                     "above GEMINI_BATCH_MIN_TASKS tasks (flex below it). docs/gemini.md#batch-api-and-flex."),
    )
    gemini_flex_timeout_s: float = Field(
        60.0, gt=0, description=("Seconds a task's Flex calls (and the waits between refusals) may take before it falls back "
                                 "to the standard tier."))
    gemini_flex_retries: int = Field(
        2, ge=0, description=("Retries on Flex after a refused (429/503) Flex call, with jittered backoff of at least the "
                              "server's RetryInfo/Retry-After and within GEMINI_FLEX_TIMEOUT_S, before the standard tier. "
                              "A refused call is billed nothing."))
    gemini_batch_min_tasks: int = Field(
        100, ge=1, description="A bulk job uses the Batch API only with more tasks than this; fewer go through flex.")
    gemini_batch_chunk: int = Field(
        200, ge=1, description="Tasks per submitted Gemini batch (images held in memory while one is built).")
    gemini_batch_poll_initial_s: float = Field(30.0, gt=0, description="Seconds before a submitted batch is first polled.")
    gemini_batch_poll_max_s: float = Field(600.0, gt=0, description="Longest wait between two polls of a batch (back-off x1.5).")
    gemini_batch_sweep_s: float = Field(
        60.0, gt=0, description=("Seconds between two sweeps of the live Gemini batches while any is live: a batch whose "
                                 "poll job is missing, ended or ran on a dead worker gets a new poll (and a dead poll's lock "
                                 "is broken)."))
    gemini_price_flex_factor: float = Field(
        0.5, ge=0, description="Flex price as a share of the standard per-token prices (Google: about half).")
    gemini_price_batch_factor: float = Field(
        0.5, ge=0, description="Batch API price as a share of the standard per-token prices (Google: half).")

    # --- routing and YOLO serving ---------------------------------------------------------------
    routing: Literal["gemini", "yolo", "auto"] = Field(
        "gemini",
        description=("gemini: Gemini first, YOLO fallback; yolo: YOLO only; "
                     "auto: YOLO once it measured at least as good as Gemini's drafts."),
    )
    yolo_model: str = Field("", description="Serve this checkpoint instead of the registry's (path to a .pt).")
    yolo_score_threshold: float = Field(
        0.25,
        description="Default YOLO confidence threshold (a tag's model_score_threshold wins).",
    )
    prediction_score: Literal["usefulness", "confidence"] = Field(
        "usefulness",
        description=("What a draft's score means. usefulness: how much YOLO would learn from a human correcting the task "
                     "(sort the Data Manager by Prediction score, descending: most useful first), re-scored after every "
                     "promotion; confidence: the mean confidence of its regions (README, Most useful tasks first)."),
    )
    yolo_imgsz: int = Field(0, ge=0, description="Inference size; 0 = the size the checkpoint was trained at.")
    yolo_device: str = Field("cpu", description="Torch device for inference.")
    yolo_threads: int = Field(0, ge=0, description="Torch threads per process for inference (0 = all cores).")
    hotswap_poll_seconds: float = Field(
        1.0,
        description="How often each process re-reads the current version (pub/sub is the fast path).",
    )
    yolo_serve_int8: bool = Field(
        True, description="Serve a version's INT8 OpenVINO export (when it passed its held-out mAP check) before its f32 ones.",
    )
    model_cache_size: int = Field(
        8, ge=1,
        description=("Projects a web process keeps models for (least recently asked dropped first, reloaded on "
                     "the next request); as many label-config model_path checkpoints again."),
    )

    # --- training -------------------------------------------------------------------------------
    yolo_base_model: str = Field(
        "yolo11n.pt",
        description=("A project's first training starts from this: official Ultralytics weights (obtained once by the "
                     "worker into MODEL_DIR/base), a local .pt, or a model yaml (random init). Weights that cannot be "
                     "had fall back to the yaml of the same name, with a warning (README, Pretrained start)."),
    )
    yolo_base_download_timeout: float = Field(
        60.0, ge=0,
        description=("Seconds the worker may spend downloading YOLO_BASE_MODEL's weights (a child process killed at "
                     "the deadline); 0 = never download (air-gapped: lsb base-model install)."),
    )
    yolo_base_bundled_dir: str = Field(
        "",
        description=("Read-only folder of base weights with their .sha256, looked at after MODEL_DIR/base (the image "
                     "sets /app/weights: Dockerfile ARG YOLO_BASE_WEIGHTS)."),
    )
    train_min_new_annotations: int = Field(
        10, ge=1,
        description="Annotation events since the last training that trigger a new one.",
    )
    train_epochs: int = Field(30, ge=1, description="Epochs per training (the time limit may stop it sooner).")
    train_min_steps: int = Field(
        240, ge=0,
        description=("A training from random init makes at least this many optimizer steps: "
                     "epochs are raised for small datasets (0 = off)."),
    )
    train_imgsz: int = Field(320, ge=32, description="Training image size.")
    train_batch: int = Field(
        8, ge=1,
        description=("Batch size; nbs is set equal, so every batch is an optimizer step (8: twice the steps of 16 in the same "
                     "time, better on 20-200 images: BENCHMARKS.md, Annotation efficiency)."),
    )
    train_device: str = Field(
        "auto",
        description="Training device: auto (cuda:0 when torch sees a GPU on the worker host, else mps, else cpu), cpu, 0, 0,1.",
    )
    train_freeze: int = Field(
        0, ge=0,
        description=("Layers of the model frozen (Ultralytics freeze=) when a first training starts from pretrained .pt weights "
                     "(YOLO_BASE_MODEL); never from a model yaml nor when fine-tuning the project's own model. 10 = yolo11n's "
                     "backbone. BENCHMARKS.md \"Freeze\"."),
    )
    train_time_limit_min: float = Field(
        5.0, ge=0,
        description=("Training wall-time budget in minutes: Ultralytics' time= re-fits the epoch count and the learning-rate "
                     "schedule to it after every epoch (TRAIN_EPOCHS, TRAIN_MIN_STEPS then unused); 0 = epochs only."),
    )
    train_val_fraction: float = Field(0.2, ge=0.05, le=0.5, description="Share of tasks held out for the promotion gate.")
    train_val_min: int = Field(4, ge=1, description="Minimum number of held-out tasks.")
    train_drafts: bool = Field(
        True,
        description=("Also train on the stored drafts (predictions) of tasks nobody has annotated (pseudo-labels). "
                     "Human labels always win; drafts never enter the held-out split (README, Learning)."),
    )
    train_draft_min_score: float = Field(
        0.5, ge=0, le=1,
        description="Draft regions scored below this are not trained on (the region's score, else its prediction's).",
    )
    train_draft_max_share: float = Field(
        0.5, ge=0, le=0.9,
        description=("At most this fraction of the training images are drafts (0.5: at most as many draft tasks as "
                     "human-annotated training tasks; 0 = none)."),
    )
    train_job_timeout: int = Field(4 * 3600, description="Seconds before RQ kills a training job.")
    promote_min_gain: float = Field(0.0, description="Promote when candidate mAP50-95 exceeds the current by more than this.")
    keep_versions: int = Field(5, ge=1, description="Versions kept per project in MODEL_DIR.")
    export_formats: str = Field(
        ",".join(EXPORT_FORMATS),
        description=("Formats a promoted model is exported to, each verified against the .pt (same boxes); "
                     "servers use the fastest present. Empty = serve the .pt."),
    )
    export_int8: bool = Field(
        True,
        description=("Also export an INT8 OpenVINO model (NNCF post-training quantization, calibrated on the training "
                     "images); kept only if its held-out mAP50-95 is within EXPORT_INT8_MAX_DROP of the .pt."),
    )
    export_int8_max_drop: float = Field(0.01, description="Largest held-out mAP50-95 loss an INT8 export may have and serve.")
    model_preload_timeout: float = Field(
        30.0, ge=0,
        description=("Seconds a training waits for every serving process to load its candidate before promoting it "
                     "(a promotion is then a pointer swap); 0 = promote at once."),
    )

    # --- pre-labeling ---------------------------------------------------------------------------
    prelabel_on_import: str = Field(
        "all",
        description=("Which tasks of an import (TASKS_CREATED) are drafted at once: all, none (drafted when opened, "
                     "by POST /prelabel or lsb push) or sample:N (N tasks spread over each import, the rest on "
                     "demand). A project's prelabel_on_import attribute on its label config's <View> wins (README, "
                     "Pre-labeling on import)."),
    )
    ls_webhook_batch_size: int = Field(
        5000, ge=1, description=("Label Studio's WEBHOOK_BATCH_SIZE (its default 5000): an import of more tasks arrives as "
                                 "several TASKS_CREATED events of this many tasks, counted as one import by sample:N."))
    prelabel_import_window_s: float = Field(
        120.0, gt=0, description=("Seconds after a full TASKS_CREATED chunk during which the next chunk counts as the same "
                                  "import for sample:N."))
    prelabel_batch: int = Field(16, ge=1, description="Tasks predicted per batch by the pre-labeling job.")
    predict_max_tasks: int = Field(
        256, ge=1,
        description=("Larger /predict batches are answered 413 and drafted by a background pre-labeling job instead, "
                     "whatever the latency estimate (bounds one request's work and memory)."),
    )
    predict_timeout: float = Field(
        100.0, gt=0,
        description="Seconds Label Studio waits for /predict (its ML_TIMEOUT_PREDICT): set both together.",
    )
    predict_inline_share: float = Field(
        0.5, gt=0, le=1,
        description=("A /predict batch is answered inline only when its estimated time (measured per-task latency, "
                     "GEMINI_CONCURRENCY calls at once) is within this share of PREDICT_TIMEOUT; else it is answered "
                     "413 and drafted by the background job (README, Memory and time bounds)."),
    )
    predict_deadline_share: float = Field(
        0.8, gt=0, le=1,
        description=("An inline /predict still running at this share of PREDICT_TIMEOUT is abandoned: answered 504 "
                     "(Label Studio stores nothing) and handed whole to the background job."),
    )
    predict_max_pixels: int = Field(
        240_000_000, ge=1,
        description=("Decoded image pixels one /predict (or job batch) holds at once; a load waits for room "
                     "(one image is always admitted). Each load reserves IMAGE_MAX_PIXELS until decoded."),
    )
    max_request_mb: int = Field(
        32, ge=1,
        description="Largest request body accepted, in MB; a JSON body whose parsed form would take more than 8x this "
                    "is refused too (413).")

    # --- webhooks and project lifecycle -----------------------------------------------------------
    webhook_dedupe_ttl: int = Field(
        3600, ge=0,
        description="Seconds a webhook delivery is remembered so a duplicate does no work twice (0 = no dedupe).",
    )
    project_delete_grace_hours: float = Field(
        24.0, ge=0,
        description=("Hours after PROJECT_DELETED before the project's models, datasets and Redis keys are removed "
                     "(0 = at once); cancelled if the project exists in Label Studio again."),
    )

    # --- local open-vocabulary drafting (lsb detect --source owlvit) ---------------------------------
    owlvit_model: str = Field(
        "google/owlv2-base-patch16-ensemble",
        description="OWL-ViT/OWLv2 weights: a local folder or a hub id already in the local HF cache (never downloaded).",
    )
    owlvit_threshold: float = Field(0.1, description="OWL-ViT score threshold.")
    owlvit_device: str = Field("cpu", description="Torch device for OWL-ViT and SAM.")
    sam_model: str = Field(
        "",
        description="SAM weights (local folder or cached hub id) for box-prompted masks; empty = boxes only.",
    )

    # --- images ---------------------------------------------------------------------------------
    image_max_bytes: int = Field(40 * 1024 * 1024, description="Largest image download accepted.")
    image_max_pixels: int = Field(80_000_000, description="Largest decoded image (decompression-bomb guard).")
    image_cache_max_mb: int = Field(
        2048, ge=1, description="Disk space for cached Label Studio uploads (DATA_DIR/images); oldest used evicted first.",
    )
    image_fetch_timeout: float = Field(
        15.0,
        description="Wall-clock seconds for one image download: connect, redirects and body together.",
    )
    image_allowed_hosts: str = Field(
        "",
        description=("Comma list of extra hosts images may be fetched from ('*' = any public host, "
                     "'*.example.com' = its subdomains), checked on every redirect hop. "
                     "Label Studio's host is always allowed."),
    )
    image_allow_private: bool = Field(
        False,
        description="Allow fetching from private/loopback addresses other than Label Studio's.",
    )
    local_files_document_root: str = Field(
        "",
        description="Read /data/local-files/?d= paths directly under this root (LS LOCAL_FILES_DOCUMENT_ROOT).",
    )

    @field_validator("webhook_secret", "basic_auth_pass")
    @classmethod
    def _not_a_placeholder(cls, value: SecretStr, info) -> SecretStr:
        """A copied .env.example must not ship a secret everyone knows: refuse to start instead."""
        if value.get_secret_value().strip().startswith(PLACEHOLDER_PREFIX):
            raise ValueError(f"{info.field_name.upper()} is still the placeholder from .env.example; set a long random "
                             "value: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return value

    @field_validator("prelabel_on_import")
    @classmethod
    def _a_prelabel_policy(cls, value: str) -> str:
        """A typo here would decide what is spent on every import: refuse to start instead."""
        return str(prelabel_policy.parse(value))

    @property
    def gemini_enabled(self) -> bool:
        return bool(self.gemini_api_key.get_secret_value()) or self.google_genai_use_vertexai

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass.get_secret_value())


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()


def configuration_table() -> str:
    """Markdown table of every variable, its default and meaning (kept in the README)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = " / ".join(alias.choices) if isinstance(alias, AliasChoices) else name.upper()
        default = field.default
        if isinstance(default, SecretStr):
            default = ""
        rows.append(f"| `{env}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(configuration_table())
