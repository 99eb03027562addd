"""The typed settings the stages read (data, teacher, student, distillation, training, evaluation): plain
dataclasses with each field's rule (``core.schema``), and ``ConfigError``. Imports nothing that trains,
exports or quantizes, so the trainer and the data code can take these types without pulling in every
registry; ``distill.config`` adds export / quantize / gate and ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.chat import TARGETS
from core.schema import choice, non_negative, positive, unit
from core.toolcalls import FORMATS
from distill.data.augment import KEEP as AUGMENT_KEEP
from distill.sharding import SHARDING

# How a student's hidden states meet the teacher's in the feature loss (distill.features.projection).
FEATURE_PROJECTIONS = ("learned", "channels")
# Who writes the data-free general text (distill.general.writer): the task teacher, or the pretrained model it was
# fine-tuned from (teacher.path under teacher.finetune), whose samples stay pretraining's kind of text.
GENERAL_WRITERS = ("teacher", "base")


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class DataConfig:
    source: str = choice("car_assistant", "jsonl")
    seed: int
    num_train: int = positive()
    num_validation: int = non_negative()
    num_test: int = positive()
    num_heldout: int = non_negative()  # unseen values / phrasings / both (car_assistant.HELDOUT_PARTS)
    reserve_modulus: int = positive()
    cross_script: float = unit()  # share of held-out values in the other script
    train_file: str | None  # jsonl source: files with "messages" or "prompt"/"completion" per line
    validation_file: str | None
    test_file: str | None
    heldout_file: str | None  # requests unlike training (new phrasings, names, places): gated apart
    max_length: int = positive()  # examples longer than this (prompt + answer tokens) are an error
    system_prompt: str | None  # given to every example that has no system message (null: none added)
    format: str = choice("text", "tool_calls")  # car_assistant: answers as JSON text, or TRL tool_calls with tools
    tools_per_example: int = non_negative()  # car_assistant tool_calls: tools listed per line (0: all)
    multi_turn: float = unit()  # car_assistant tool_calls: share of lines with a tool result and a second request
    tools_file: str | None  # jsonl: the tools (a JSON list of function schemas) of lines without their own
    chat_template: str | None  # the template data is rendered with: a name (conf/templates) or a .jinja file
    targets: str = choice(*TARGETS)  # assistant turns trained on: all | last
    tool_format: str = choice("auto", *FORMATS)  # how answers' calls are parsed: auto = read from the template


@dataclass
class TrainConfig:
    steps: int = positive()
    batch_size: int = positive()  # per process, per micro-batch
    grad_accum: int = positive()
    lr: float = positive()
    weight_decay: float = non_negative()
    warmup_steps: int = non_negative()
    schedule: str = choice("cosine", "linear", "constant")
    max_grad_norm: float = non_negative()
    mixed_precision: str = choice(
        "auto", "no", "bf16", "fp16", "bf16_if_native"
    )  # bf16_if_native: resolved by validate
    seed: int
    log_every: int = positive()
    eval_every: int = non_negative()  # steps between validation-loss evaluations; 0 disables
    checkpoint_every: int = non_negative()  # 0 disables
    keep_checkpoints: int = positive()
    spike_factor: float = positive()  # a loss above spike_factor x its running mean is a spike: the step is skipped
    spike_warmup: int = non_negative()  # steps before spikes are judged
    max_spikes: int = non_negative()  # more skipped steps than this in a row stops training with an error
    group_by_length: bool  # batches of similar lengths (less padding, faster); the order stays seeded
    split_by_length: int = (
        positive()
    )  # each batch runs as N micro-batches of similar lengths: same examples and gradient, less padding
    eval_generate: int = non_negative()  # validation examples greedy-generated at each eval_every (exact match)
    pack: bool  # each micro-batch's examples packed into rows (per-example attention, positions): no padding
    sharding: str = choice(*SHARDING)  # none: every process holds whole models (DDP); fsdp: FSDP2 per decoder layer


@dataclass
class BootstrapConfig:
    vocab_size: int = positive()
    hidden_size: int = positive()
    intermediate_size: int = positive()
    num_hidden_layers: int = positive()
    num_attention_heads: int = positive()
    num_key_value_heads: int = positive()
    max_position_embeddings: int = positive()
    tie_word_embeddings: bool
    train: TrainConfig
    min_exact_match: float = unit()  # warn when the bootstrapped teacher scores below this on test
    random_values: float = unit()  # share of its training examples with random open values (it learns to copy)


@dataclass
class LoraConfig:
    enabled: bool
    r: int = positive()
    alpha: int
    dropout: float = non_negative()
    target_modules: list[str]


@dataclass
class FinetuneConfig:
    enabled: bool  # fine-tune teacher.path on the run's training data first (cached by base, data, settings)
    lora: LoraConfig  # lora.enabled: LoRA adapters merged back after training; false: every weight trains
    train: TrainConfig
    min_exact_match: float = unit()  # warn when the fine-tuned teacher scores below this on test


@dataclass
class TeacherConfig:
    path: str | None  # local HF folder or .gguf file; null bootstraps (and caches) a small teacher
    quantization: str = choice("none", "8bit", "nf4")  # bitsandbytes; loading only, the teacher is frozen
    allow_pickle: bool
    trust_remote_code: bool  # run the model folder's own Python code (auto_map); false refuses such folders
    cache_dir: str
    bootstrap: BootstrapConfig
    finetune: FinetuneConfig


@dataclass
class PruneConfig:
    method: str = choice("activation", "magnitude")
    strategy: str = choice("width", "depth")  # for budgets
    fraction: float | None = unit()  # parameter budget as a fraction of the teacher's; null = explicit sizes
    align: int = positive()  # hidden / MLP sizes are multiples of this
    prune_heads: bool  # budget pruning may remove attention heads (whole KV groups / equal heads per group)
    depth: int | None = positive()  # with a budget: layers kept (null = the teacher's); width fills the budget
    hidden_fraction: float | None = unit()  # with a width budget: share of the hidden size kept; the MLP fills the rest
    calib_examples: int = positive()  # training examples whose activations rank channels, heads and layers
    calib_general: int = non_negative()  # + this many general-text sequences (distill.general) in the calibration


@dataclass
class StudentConfig:
    init: str = choice("config", "folder", "prune")
    path: str | None  # for init=folder
    hidden_size: int | None = positive()
    intermediate_size: int | None = positive()
    num_hidden_layers: int | None = positive()
    num_attention_heads: int | None = positive()
    num_key_value_heads: int | None = positive()
    tie_word_embeddings: bool | None
    seed: int
    lora: LoraConfig
    prune: PruneConfig


@dataclass
class FeatureConfig:
    weight: float = non_negative()  # 0 disables feature distillation
    layer_map: list[list[int]]  # [[student_layer, teacher_layer], ...], 0-based decoder layers
    kind: str = choice("cosine", "mse")
    attention: bool  # also match attention-block outputs of the mapped layers
    # learned: a trained linear map to the teacher's width; channels: the teacher at the hidden channels pruning kept
    projection: str = choice(*FEATURE_PROJECTIONS)


@dataclass
class OnPolicyConfig:
    fraction: float = unit()  # share of steps that train on the student's own sampled answers (GKD)
    temperature: float = positive()
    max_new_tokens: int = positive()


@dataclass
class AugmentConfig:
    examples: int = (
        non_negative()
    )  # new requests: training requests with random open values, answered by the teacher; 0: off
    share: float = unit()  # of every training batch
    cross_script: float = unit()  # share of random values in the other script
    batch_size: int = positive()  # teacher generation batch
    seed: int
    keep: str = choice(
        *AUGMENT_KEEP
    )  # consistent: the teacher's own consistent answers | implied: every one, its implied call


@dataclass
class GeneralConfig:
    examples: int = non_negative()  # general-text sequences (the teacher's own samples, or data.general_file); 0: off
    share: float = unit()  # of every training batch
    length: int = positive()  # tokens per sequence
    temperature: float = positive()  # sampling temperature of the teacher's sequences
    batch_size: int = positive()  # generation batch
    file: str | None  # a text corpus instead (JSONL with "text" per line), cut into sequences of `length` tokens
    seed: int
    writer: str = choice(*GENERAL_WRITERS)  # who samples the text (the KD targets stay the teacher's logits)


@dataclass
class DistillConfig:
    divergence: str  # a name in distill.losses.DIVERGENCES (checked in validate)
    temperature: float = positive()
    kd_weight: float = unit()  # loss = kd_weight * KD + (1 - kd_weight) * CE on the reference answer
    beta: float = unit()  # jsd
    skew_alpha: float = unit()  # skew_kl
    chunk_size: int = positive()  # tokens per logit chunk; bounds memory at chunk_size x vocab per model
    signals: str = choice("live", "topk")  # teacher logits computed every step, or its top-k cached once
    topk: int = positive()  # tokens kept per position by signals=topk
    features: FeatureConfig
    on_policy: OnPolicyConfig
    augment: AugmentConfig  # teacher-labelled requests with new open values (distill.augment)
    general: GeneralConfig  # general text mixed into KD (distill.general)
    train: TrainConfig


@dataclass
class EvalConfig:
    batch_size: int = positive()
    max_new_tokens: int | None = positive()  # null: the longest reference answer of the split (+ end of turn)
    chunk_size: int = positive()  # answer tokens per logit chunk in teacher-forced metrics (memory, not results)
    kl_topk: int = (
        non_negative()
    )  # KL / agreement against the teacher's cached top-k log-probs; 0: exact (teacher reruns)
    num_test: int | None = positive()  # evaluate on the first N test / heldout examples; null = all
    retention_target: float = unit()  # student test exact match / teacher's; reported
