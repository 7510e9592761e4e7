"""Fed-SB's names on the wire: routine names, instruction options, reply metrics and tensor suffixes.

Options travel under :data:`fedtune.protocol.STRATEGY_PREFIX`; every key here belongs to
Fed-SB (LoRA-SB), so a key's module says which method it is for.
"""

from fedtune.protocol import LORA_A, LORA_B  # noqa: F401  (re-exported: Fed-SB's modules take every key from here)

LORA_R = ".lora_R.weight"
R_LAYER = "lora_R"

# Client routines (ClientInstruction.routine) a LoRA-SB federation asks for.
LORA_SB_INIT_ROUTINE = "lora-sb-init"  # estimate the first update, reply with its sketch
LORA_SB_ROUTINE = "lora-sb"  # AdamW on R (and the head) with B and A frozen

# ClientInstruction.options keys (sent under protocol.STRATEGY_PREFIX by the glue).
CFG_ROUND = "round"
CFG_INIT_SEED = "init_seed"
CFG_INIT_RANK = "init_rank"
CFG_INIT_SAMPLES = "init_samples"
CFG_INIT_ESTIMATOR = "init_estimator"
CFG_INIT_STAGE = "init_stage"  # one of INIT_STAGES
CFG_INIT_LEARNING_RATE = "init_learning_rate"
CFG_INIT_WARMUP_RATIO = "init_warmup_ratio"
CFG_INIT_ROUNDS = "init_rounds"  # how many of the run's rounds the initialisation takes
# MetricRecord keys a LoRA-SB client adds to its reply.
METRIC_ROUND = "lora_sb_round"
METRIC_SKETCH_FINGERPRINT = "lora_sb_sketch_fingerprint"
# η of the initial step over the RMS of the adapted base weights: how far the first step moves them.
METRIC_INIT_STEP_RELATIVE = "init_step_relative_rms"

ESTIMATORS = ("adam", "sgd")
INIT_STAGES = ("single", "range", "corange", "dense")
SKETCH_RANGE, SKETCH_CORANGE, DENSE_ESTIMATE = ".sketch_range", ".sketch_corange", ".update_estimate"
SKETCH_BASIS = ".sketch_basis"  # server -> client: Q (m×k) or P (n×k) of a multi-pass init
