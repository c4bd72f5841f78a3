"""Every check of a config that is not one argument group's own: the loss settings against the loss
registry, and the checks that read several groups. `build_config` reports them with the groups' own
`problems()`, all at once.
"""

from __future__ import annotations

from prefalign.errors import did_you_mean
from prefalign.losses import F_DIVERGENCES, LOSSES, LossSettings, needs_reference, unknown_loss


def _hint(value, choices) -> str:
    hint = did_you_mean(value, choices)
    return f"{hint} " if hint else ""


def cross_group_problems(model, data, ft, training: dict, command: str = "train") -> list[str]:
    """Checks that read more than one argument group (`training`: the training keys given) for the prefalign
    `command` the config is for.

    The one place for them: a check of one group's own fields is that group's `problems()`.
    """
    from prefalign.config.paths import path_problems
    from prefalign.config import scale

    problems = []
    evaluates = str(training.get("eval_strategy") or "no") != "no"
    if command == "train" and evaluates and not data.val_size and not data.eval_dataset:
        problems.append(f"eval_strategy: {training['eval_strategy']} evaluates held-out pairs, and this config holds "
                        "none out: set val_size (e.g. 0.1) or eval_dataset, or eval_strategy: no")
    if ft.early_stopping_steps is not None:
        problems += _early_stopping_problems(ft.early_stopping_steps, data, training)
    if training.get("do_train") is False:
        problems.append("do_train: false: prefalign train always trains; to score a model without training "
                        "run `prefalign eval CONFIG`")
    if data.streaming:
        if (training.get("max_steps") or -1) <= 0:
            problems.append("streaming: true reads the training pairs as a stream with no length, so the run needs "
                            "max_steps (as in LLaMA-Factory); set max_steps")
        if training.get("train_sampling_strategy", "random") not in ("random", "sequential"):
            problems.append(f"streaming and train_sampling_strategy: {training['train_sampling_strategy']} both given: "
                            "a stream is read in order through its shuffle buffer (buffer_size); remove one")
    return (problems + training_problems(training) + path_problems(model, ft, training["output_dir"])
            + scale.problems(model, ft, training))


def _early_stopping_problems(patience: int, data, training: dict) -> list[str]:
    """What transformers' EarlyStoppingCallback asserts, as one line each naming the key to set."""
    problems = []
    if patience < 1:
        problems.append(f"early_stopping_steps: {patience} must be at least 1 (evaluations without improvement)")
    if str(training.get("eval_strategy") or "no") == "no":
        problems.append("early_stopping_steps needs evaluations: set eval_strategy: steps (with eval_steps) or epoch")
    if not training.get("metric_for_best_model"):
        problems.append("early_stopping_steps needs metric_for_best_model, the metric that must improve, e.g. "
                        "eval_loss (or rewards/accuracies with greater_is_better: true)")
    if str(training.get("eval_strategy") or "no") == "no" and not data.val_size and not data.eval_dataset:
        # (with evaluations on, cross_group_problems names the missing held-out data itself)
        problems.append("early_stopping_steps needs held-out data: set val_size (e.g. 0.1) or eval_dataset")
    return problems


def training_problems(training: dict) -> list[str]:
    """transformers' keys that it accepts but that train nothing, or fail only after data and models are loaded."""
    problems = []
    lr = training.get("learning_rate")
    if lr is not None and lr <= 0:
        what = "trains nothing: the weights would stay as loaded" if lr == 0 else "is negative"
        problems.append(f"learning_rate: {lr} {what}; give a positive rate, e.g. 5e-6 (full) or 5e-5 (LoRA)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if training.get(key) is not None and training[key] < 1:
            problems.append(f"{key}: {training[key]} must be at least 1")
    max_steps, epochs = training.get("max_steps"), training.get("num_train_epochs")
    if max_steps is not None and max_steps < -1:
        problems.append(f"max_steps: {max_steps} must be a positive number of steps, or -1 to train num_train_epochs")
    if (max_steps is None or max_steps <= 0) and epochs is not None and epochs <= 0:
        problems.append(f"num_train_epochs: {epochs} trains nothing; give a positive number of epochs or set max_steps")
    for key in ("warmup_steps", "max_grad_norm", "weight_decay"):
        if training.get(key) is not None and training[key] < 0:
            problems.append(f"{key}: {training[key]} must not be negative")
    for key in ("save_steps", "logging_steps", "eval_steps"):
        if training.get(key) is not None and training[key] <= 0:
            problems.append(f"{key}: {training[key]} must be positive")
    return problems


def loss_settings_of(ft) -> LossSettings:
    """The loss hyper-parameters of a `FinetuningArguments`: the one mapping of config keys to `LossSettings`."""
    return LossSettings(
        beta=ft.pref_beta,
        label_smoothing=ft.dpo_label_smoothing,
        simpo_gamma=ft.simpo_gamma,
        ftx=ft.pref_ftx,
        discopop_tau=ft.discopop_tau,
        ld_alpha=ft.ld_alpha,
        bco_weight=ft.pref_bco_weight,
        use_weighting=ft.use_weighting,
        f_divergence_type=ft.f_divergence_type,
        f_alpha_divergence_coef=ft.f_alpha_divergence_coef,
        kto_chosen_weight=ft.kto_chosen_weight,
        kto_rejected_weight=ft.kto_rejected_weight,
    )


def stage_problems(ft) -> list[str]:
    """The losses and settings `stage` allows: kto reads unpaired examples, dpo pairs; [] if they agree."""
    known = [name for name in ft.pref_loss or [] if name in LOSSES]
    problems = []
    if ft.stage == "kto":
        paired = [name for name in known if not LOSSES[name].unpaired]
        if paired:
            problems.append(f"pref_loss={_names_list(paired)} compares preference pairs, but stage: kto trains on "
                            "unpaired examples; use pref_loss: kto or apo_zero_unpaired (or stage: dpo)")
        for key, value, off in (("ld_alpha", ft.ld_alpha, None), ("use_weighting", ft.use_weighting, False),
                                ("pref_bco_weight", ft.pref_bco_weight, 0.0)):
            if value != off:
                problems.append(f"{key} weighs a pair's two replies against each other; stage: kto has one reply per "
                                f"example, so remove {key}")
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            if getattr(ft, key) <= 0:
                problems.append(f"{key}={getattr(ft, key)} must be > 0 (it weighs the "
                                f"{'desirable' if 'chosen' in key else 'undesirable'} examples' losses); e.g. 1.0")
    else:
        unpaired = [name for name in known if LOSSES[name].unpaired]
        if unpaired:
            problems.append(f"pref_loss={_names_list(unpaired)} trains on unpaired examples (a reply with a label); "
                            "set stage: kto, or use a pair loss such as sigmoid (or kto_pair)")
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            if getattr(ft, key) != 1.0:
                problems.append(f"{key} weighs the examples of stage: kto, but stage is {ft.stage}; set stage: kto "
                                f"or remove {key}")
    return problems



def _names_list(names: list[str]) -> str:
    return ",".join(names)


def loss_problems(
    names: list[str], weights: list[float] | None, settings: LossSettings, has_ref_model: bool
) -> list[str]:
    """Every problem with the loss configuration, one line each naming the config keys and the fix; [] if none.

    `names` / `weights` are `pref_loss` / `pref_loss_weights`; `has_ref_model` says whether `ref_model` was given.
    """
    problems: list[str] = []
    s = settings
    defaults = LossSettings()
    loss_label = f"pref_loss={_names_list(names)}"

    if not names:
        problems.append("pref_loss is empty; name at least one loss, e.g. pref_loss: sigmoid")
    unknown = [name for name in names if name not in LOSSES]
    problems += [unknown_loss(name) for name in unknown]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(
            f"pref_loss lists {', '.join(duplicates)} more than once; list each loss once and "
            "set its weight in pref_loss_weights"
        )
    known = [name for name in names if name in LOSSES]
    specs = [LOSSES[name] for name in known]

    def read_by(field: str) -> list[str]:
        return [name for name in known if field in LOSSES[name].reads]

    def readers_hint(field: str) -> str:
        return ", ".join(name for name, spec in LOSSES.items() if field in spec.reads)

    if weights is not None:
        if len(weights) != len(names):
            problems.append(
                f"pref_loss_weights has {len(weights)} weights but pref_loss names {len(names)} losses; "
                "give one weight per loss, in the same order"
            )
        negative = [f"{name}={weight}" for name, weight in zip(names, weights) if weight < 0]
        if negative:
            problems.append(
                f"pref_loss_weights has negative weights ({', '.join(negative)}), which would maximise "
                "those pref_loss terms; use weights >= 0"
            )

    if s.beta <= 0:
        problems.append(f"pref_beta={s.beta} must be > 0 (it scales the log-ratios of every pref_loss); e.g. 0.1")

    # What each chosen loss needs of the settings (its registry entry's constraints); a field whose
    # constraint failed is not reported again by the general range checks below.
    failed = set()
    for spec in specs:
        for c in spec.constraints:
            value = getattr(s, c.field)
            if not c.ok(value) and c.field not in failed:
                failed.add(c.field)
                problems.append(c.problem.format(value=value))

    # Label smoothing
    eps = s.label_smoothing
    if "label_smoothing" in failed:
        pass
    elif not 0 <= eps < 0.5:
        problems.append(f"dpo_label_smoothing={eps} must be in [0, 0.5); it is the assumed rate of flipped labels")
    elif eps > 0 and known and not read_by("label_smoothing"):
        problems.append(
            f"{loss_label} does not use dpo_label_smoothing={eps}; remove dpo_label_smoothing or use one of "
            f"pref_loss={readers_hint('label_smoothing')}"
        )

    # Settings read by one loss only
    if s.simpo_gamma != defaults.simpo_gamma and known and not read_by("simpo_gamma"):
        problems.append(
            f"{loss_label} does not use simpo_gamma={s.simpo_gamma}; remove simpo_gamma or use pref_loss=simpo"
        )
    if s.discopop_tau <= 0:
        problems.append(f"discopop_tau={s.discopop_tau} must be > 0 (pref_loss=discopop divides by it); e.g. 0.05")
    elif s.discopop_tau != defaults.discopop_tau and known and not read_by("discopop_tau"):
        problems.append(
            f"{loss_label} does not use discopop_tau={s.discopop_tau}; remove discopop_tau or use pref_loss=discopop"
        )

    # f-DPO
    if s.f_divergence_type not in F_DIVERGENCES:
        problems.append(
            f"f_divergence_type: unknown divergence {s.f_divergence_type!r}; "
            f"{_hint(s.f_divergence_type, F_DIVERGENCES)}known: {', '.join(F_DIVERGENCES)}"
        )
    elif s.f_divergence_type != defaults.f_divergence_type and known and not read_by("f_divergence_type"):
        problems.append(
            f"f_divergence_type={s.f_divergence_type} only changes pref_loss=sigmoid, which {loss_label} does not "
            "include; remove f_divergence_type or add sigmoid to pref_loss"
        )
    if s.f_alpha_divergence_coef <= 0:
        problems.append(
            f"f_alpha_divergence_coef={s.f_alpha_divergence_coef} must be > 0 "
            "(f_divergence_type=alpha_divergence divides by it); e.g. 0.5"
        )
    elif s.f_alpha_divergence_coef != defaults.f_alpha_divergence_coef and s.f_divergence_type != "alpha_divergence":
        problems.append(
            f"f_alpha_divergence_coef={s.f_alpha_divergence_coef} is only read when "
            f"f_divergence_type=alpha_divergence, but f_divergence_type={s.f_divergence_type}; "
            "remove f_alpha_divergence_coef or set f_divergence_type=alpha_divergence"
        )

    # Modifiers
    if s.ftx < 0:
        problems.append(f"pref_ftx={s.ftx} must be >= 0 (a negative weight would unlearn the chosen replies)")
    if s.bco_weight < 0:
        problems.append(f"pref_bco_weight={s.bco_weight} must be >= 0")
    elif s.bco_weight > 0 and "bco_pair" in known:
        problems.append(
            "pref_bco_weight adds bco_pair, which pref_loss already lists; remove pref_bco_weight or drop bco_pair "
            "from pref_loss (and weight it in pref_loss_weights)"
        )
    if s.ld_alpha is not None:
        if not 0 <= s.ld_alpha <= 1:
            problems.append(f"ld_alpha={s.ld_alpha} must be in [0, 1] (1 is plain DPO); e.g. 0.5")
        elif known and all(spec.averaged for spec in specs):
            problems.append(
                f"ld_alpha reweighs summed log-probs, but {loss_label} only reads length-averaged ones; "
                "remove ld_alpha or use a summed loss such as pref_loss=sigmoid"
            )
    not_per_pair = [name for name in known if not LOSSES[name].per_pair]
    if s.use_weighting and not_per_pair:
        problems.append(
            f"use_weighting weighs each pair, but pref_loss={','.join(not_per_pair)} sorts log-ratios across the "
            "batch so its losses belong to no single pair; set use_weighting=false or use another pref_loss"
        )

    # Reference model
    if has_ref_model and known and not needs_reference(known, s):
        problems.append(
            f"ref_model is set but {loss_label} is reference-free and never reads it; remove ref_model "
            "(it costs memory and a forward pass) or use a loss that needs one, e.g. pref_loss=sigmoid"
        )
    return problems
