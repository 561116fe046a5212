"""The loop's settings: every knob of a run of rounds, in one place (`RunConfig.loop`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from misstep.metrics.health import StopRule
from misstep.optimize.arms import KEEP_ARMS
from misstep.signatures import DEFAULT_ERROR_TYPES, get_error_type

SEED_SOURCES = ("gsm8k", "procedural")  # where each round's seed chains come from
LEVEL_SELECTIONS = ("curriculum", "uniform")  # how the level of procedural seed chains is chosen
COMPILE_FROM = ("previous", "round-0")  # the weights each round's compile starts from

# How an arm of a side-by-side run draws its seed chains: the training file, or procedural problems
# at the level the curriculum chooses or at levels drawn uniformly. An arm is named `<keep>` or
# `<keep>-<seed mode>` ("judge-curriculum").
SEED_MODES: dict[str, dict[str, str]] = {
    "gsm8k": {"seeds_from": "gsm8k"},
    "curriculum": {"seeds_from": "procedural", "level_selection": "curriculum"},
    "uniform": {"seeds_from": "procedural", "level_selection": "uniform"},
}


def arm_parts(name: str) -> tuple[str, str | None]:
    """An arm's name as its keep arm (`LoopSettings.keep`) and seed mode (None: the loop's own)."""
    keep, dash, mode = name.partition("-")
    if keep not in KEEP_ARMS or (dash and mode not in SEED_MODES):
        raise ValueError(
            f"an arm is <keep> or <keep>-<seed mode> (keep: {', '.join(KEEP_ARMS)}; seed mode: "
            f"{', '.join(SEED_MODES)}), not {name!r}"
        )
    return keep, mode or None


def each_once(values: list[str], what: str) -> None:
    """Refuse a name given twice: a repeat is a slip (another one meant), and running it once would hide that."""
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"each {what} once: {', '.join(map(repr, repeated))} given more than once")


@dataclass
class LoopSettings:
    """Every knob of the loop, in one place (the CLI fills it from its options)."""

    rounds: int = 3
    seed_chains: int = 32  # valid chains the model writes scenarios from, each round
    error_types: list[str] = field(default_factory=lambda: list(DEFAULT_ERROR_TYPES))
    ground_truth: int = 16  # worked examples per stage in every compile (no model wrote them)
    warm_up: bool = True  # round 0 fine-tunes on the ground truth alone, so the model's answers parse
    judge_warm_up: bool = True  # the judge gets its own weights, fine-tuned on ground-truth judgements alone
    # Epochs of that fine-tune (None: the compile's `[train] epochs`). The judge learns from a few
    # dozen examples: one epoch is a dozen steps, too few for it to tell its own examples apart.
    judge_epochs: float | None = None
    # Tokens a judge's training record keeps (None: the compile's `[train] max_length`). Its prompts
    # hold four chains; a longer record loses its prompt's head (instructions, question, correct chain).
    judge_max_length: int | None = None
    # Recompute activations in the judge's fine-tune (None: the compile's `[train]
    # gradient_checkpointing`). Its four-chain records need it where the student's shorter ones,
    # which then keep the shared-prefix pass that checkpointing turns off, do not.
    judge_gradient_checkpointing: bool | None = None
    # Stage-3 chains labelled by the injector (the positive control's data: first errors where the
    # injector puts them, as in the held-out splits, 15% valid) added to round 0's warm-up, so the loop
    # starts from a model trained on as many locations as the control needed to learn one (0: none).
    locate_warm_up: int = 0
    demos: int = 2  # per stage, for the judge (and the student when there is no warm-up)
    active_selection: bool = True
    exploration: float = 0.3  # share of each round's seeds and error-type weight chosen at random
    # Which of the student's own answers a round trains stages 3-4 on (optimize/arms.py): "judge" (the
    # seed's cycle), "oracle" (the ceiling), "all" or "random" (floors).
    keep: str = "judge"
    # Answers of stages 3-6 per written chain: the cycle's own (greedy) and candidates - 1 more sampled
    # at candidate_temperature, each judged and checked; the arm keeps the good ones (rejection sampling).
    candidates: int = 1
    candidate_temperature: float = 0.7
    # The weights each round's compile trains, on everything kept so far: "previous" (the last round's
    # model) or "round-0" (STaR's and ReST-EM's restart: every round's model is round 0 trained once on
    # the data so far, so it is never trained twice on its own early answers, and making one round's
    # weights again on a new machine costs one training, not a chain of them).
    compile_from: str = "previous"
    # The generation-verification gap (optimize/verification.py): up to `verification_chains` chains
    # reserved from the seeds, recovered twice each by round 0's student until a quarter of
    # `verification_size` recoveries the oracle accepts and a quarter it rejects are found; the set of
    # `verification_size` is judged every round by the frozen judge and the student's weights.
    verification_chains: int = 60
    verification_size: int = 120
    # The student judges its own recoveries (stages 5-6 on its weights, trained on the judge's ground
    # truth in every compile) instead of the frozen judge.
    self_judge: bool = False
    # The reported GSM8K set's first this-many chains with a mistake are also recovered from, each round
    # (the same items every round, so rounds and arms pair); None: all of them.
    recovery_items: int | None = None
    tuning_trials: int = 60
    min_yield: float = 0.05
    stop: StopRule = field(default_factory=StopRule)
    primary_metric: str = "location_accuracy"  # of the GSM8K held-out set: what the stop rule watches
    num_threads: int = 8
    seed: int = 0
    # Every stage's answer decoded under its format's grammar (programs/answer_format.py), so that it
    # parses; off, the model's own text, parsed as it comes (it changes every accuracy).
    constrained: bool = True
    # Where each round's seed chains come from: "gsm8k" (the training file) or "procedural"
    # (data/procedural.py), at the level the curriculum chooses or at levels drawn uniformly.
    seeds_from: str = "gsm8k"
    level_selection: str = "curriculum"
    start_level: int = 1
    probe_items: int = 40  # injected chains a level the curriculum probes the model with, each round

    def __post_init__(self) -> None:
        for name, least in (
            ("rounds", 1),
            ("seed_chains", 1),
            ("tuning_trials", 1),
            ("num_threads", 1),
            ("candidates", 1),
            ("ground_truth", 0),
            ("demos", 0),
            ("verification_chains", 0),
            ("verification_size", 4),
            ("locate_warm_up", 0),
        ):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, not {getattr(self, name)}")
        if self.seeds_from not in SEED_SOURCES:
            raise ValueError(f"seeds_from must be {' or '.join(map(repr, SEED_SOURCES))}, not {self.seeds_from!r}")
        if self.level_selection not in LEVEL_SELECTIONS:
            choices = " or ".join(map(repr, LEVEL_SELECTIONS))
            raise ValueError(f"level_selection must be {choices}, not {self.level_selection!r}")
        if not 0 < self.candidate_temperature <= 2:
            raise ValueError(f"candidate_temperature must be in (0, 2], not {self.candidate_temperature}")
        if self.compile_from not in COMPILE_FROM:
            choices = " or ".join(map(repr, COMPILE_FROM))
            raise ValueError(f"compile_from must be {choices}, not {self.compile_from!r}")
        if self.keep not in KEEP_ARMS:
            raise ValueError(f"keep must be one of {', '.join(map(repr, KEEP_ARMS))}, not {self.keep!r}")
        if self.recovery_items is not None and self.recovery_items < 1:
            raise ValueError(f"recovery_items must be at least 1 (or None: all), not {self.recovery_items}")
        if self.locate_warm_up and not self.warm_up:
            raise ValueError("locate_warm_up adds to round 0's warm-up: it needs warm_up")
        if self.probe_items < 1:
            raise ValueError(f"probe_items must be at least 1, not {self.probe_items}")
        if self.judge_epochs is not None and self.judge_epochs <= 0:
            raise ValueError(f"judge_epochs must be above 0 (or None: the compile's epochs), not {self.judge_epochs}")
        if self.judge_max_length is not None and self.judge_max_length < 16:
            raise ValueError(
                f"judge_max_length must be at least 16 (or None: the compile's max_length), not {self.judge_max_length}"
            )
        if not self.error_types:
            raise ValueError("error_types names no error type")
        for name in self.error_types:
            try:
                get_error_type(name)
            except KeyError as exc:  # a setting, not a lookup: say so as a bad value, naming the registered ones
                raise ValueError(exc.args[0]) from None
