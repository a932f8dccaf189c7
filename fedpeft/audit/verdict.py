"""A short plain-language verdict per variant, with the settings that would lower the risk.

The thresholds are rules of thumb stated in the text, not a standard: what they sort
into "high" is a leak an attacker can act on (a membership attack right well above
chance, or a secret ranked near the top of its candidates), "moderate" a measurable one.

Rules (the first that fires sets the level):

* **violation**: an empirical epsilon lower bound above the reported epsilon: a bug in
  the DP implementation or a broken assumption, whatever else the numbers say.
* **high**: membership AUC >= 0.7, or TPR >= 10 % at 1 % FPR, or inserted canaries
  whose mean exposure reaches half the largest measurable and beats never-inserted
  canaries by >= 2 bits, or an attack recovering >= 50 % of a batch's tokens.
* **moderate**: AUC >= 0.6, or TPR >= 3 % at 1 % FPR, or inserted canaries' mean
  exposure >= 2 bits above the never-inserted ones', or token recall >= 20 %.
* **low**: none of these.

An AUC counts only when it is also more than two null standard deviations above 0.5
(:func:`fedpeft.audit.membership.auc_null_std`), and a TPR at 1 % FPR only when a
scorer that knows nothing reaches it less than 2.5 % of the time
(:func:`fedpeft.audit.membership.tpr_p_value`; at 1 % FPR a few hundred examples allow
two or three false positives, and chance alone then finds 3 % of the members in one run
of eight): small audits must not cry wolf.
"""

from __future__ import annotations

from typing import Any

from fedpeft.audit.membership import tpr_p_value

LEVELS = ("low", "moderate", "high", "violation")


SIGNIFICANT_TPR = 0.025
"""A TPR at 1 % FPR counts in the verdict when chance reaches it less often than this."""


def _best_membership(variant: dict[str, Any]) -> tuple[float, float, float]:
    """Best AUC, the AUC that counts (0.5 unless significant), best TPR at 1 % FPR that counts."""
    membership = variant.get("membership")
    if not membership:
        return 0.5, 0.5, 0.0
    auc = max(a["auc"] for a in membership["attacks"])
    counted = auc if auc > 0.5 + 2 * membership["auc_null_std"] else 0.5
    members, non_members = membership["members"], membership["non_members"]
    significant = [
        a["tpr_at_fpr"]["0.01"]
        for a in membership["attacks"]
        if tpr_p_value(a["tpr_at_fpr"]["0.01"], members, non_members, 0.01) < SIGNIFICANT_TPR
    ]
    return auc, counted, max(significant, default=0.0)


def _canary_signal(variant: dict[str, Any]) -> tuple[float, float]:
    """Inserted canaries' mean exposure (share of the maximum) and its lead in bits over the rest."""
    canaries = variant.get("canaries")
    if not canaries or canaries["mean_exposure_included"] is None:
        return 0.0, 0.0
    share = canaries["mean_exposure_included"] / canaries["max_exposure"]
    baseline = canaries["mean_exposure_excluded"]
    gap = canaries["mean_exposure_included"] - (baseline if baseline is not None else 1.44)
    return share, gap


def _token_recall(variant: dict[str, Any]) -> float:
    attacks = variant.get("attacks") or {}
    return max((o["token_recall"] for o in attacks.get("outcomes", [])), default=0.0)


def variant_verdict(variant: dict[str, Any]) -> dict[str, Any]:
    """Risk level, the reasons for it, and what would lower it, for one audited variant."""
    auc, counted_auc, tpr = _best_membership(variant)
    share, gap = _canary_signal(variant)
    recall = _token_recall(variant)
    violations = [b for b in variant["one_run"] if b["violation"]]
    reasons = []
    if violations:
        level = "violation"
        for b in violations:
            bound = "unbounded" if b["epsilon_lower_bound"] is None else f"{b['epsilon_lower_bound']:.2f}"
            reasons.append(
                f"the {b['source']} prove epsilon >= {bound}, above the reported "
                f"{b['reported_epsilon']:.2f}: the DP implementation has a bug or an assumption is broken"
            )
    elif counted_auc >= 0.7 or tpr >= 0.1 or (share >= 0.5 and gap >= 2) or recall >= 0.5:
        level = "high"
    elif counted_auc >= 0.6 or tpr >= 0.03 or gap >= 2 or recall >= 0.2:
        level = "moderate"
    else:
        level = "low"
    membership = variant.get("membership")
    if membership:
        noise = "" if counted_auc > 0.5 else ", within chance for this many examples"
        reasons.append(f"membership inference reaches AUC {auc:.2f}{noise}")
        if tpr >= 0.03:  # a rule above fires on it: say so, AUC aside
            reasons.append(
                f"at 1 % false positives the best membership attack finds {100 * tpr:.1f} % of the "
                "members (chance: 1 %)"
            )
    if variant.get("canaries"):
        reasons.append(
            f"inserted canaries reach {100 * share:.0f} % of the measurable exposure on average, "
            f"{gap:+.1f} bits against never-inserted ones"
        )
    if (variant.get("attacks") or {}).get("status") == "ran":
        reasons.append(f"gradient inversion recovers up to {100 * recall:.0f} % of a batch's tokens")
    reported = variant.get("reported_example_epsilon")
    guarantee = (
        f"each training example is protected at epsilon {reported:.2f}"
        if reported is not None
        else "there is no formal guarantee (no differential privacy)"
    )
    reasons = [reason[0].upper() + reason[1:] for reason in reasons]
    return {
        "variant": variant["name"],
        "level": level,
        "guarantee": guarantee,
        "reasons": reasons,
        "recommendations": recommendations(variant, level),
    }


def recommendations(variant: dict[str, Any], level: str) -> list[str]:
    """Settings that would lower the measured risk of ``variant``."""
    tips = []
    dp = variant["guarantees"]["dp"]
    if level == "violation":
        tips.append(
            "Do not rely on the reported epsilon: check that clients run the unmodified DP-SGD "
            "client, that batches are Poisson-sampled, and that no example is duplicated."
        )
    if not dp:
        tips.append(
            "Turn on example-level DP-SGD ([privacy.example] enabled = true, target_epsilon = 8 or "
            "lower): it bounds what any attack in this report can learn about one example."
        )
    elif level in ("high", "moderate"):
        units = {unit["unit"] for unit in variant["guarantees"]["units"]}
        if "example" in units:
            tips.append(
                "Lower privacy.example.target_epsilon (more noise per step, noise_multiplier up), or "
                "clip harder (privacy.example.max_grad_norm down)."
            )
        else:
            tips.append(
                "User-level DP (privacy.client) adds its noise on the server, after the server has seen "
                "every client's update: it protects against whoever sees the global adapter, not against "
                "the server. Add example-level DP-SGD on the clients ([privacy.example]) for that."
            )
    canaries = variant.get("canaries")
    if canaries and canaries["repetitions"] > 1 and _canary_signal(variant)[1] >= 2:
        tips.append(
            f"Deduplicate training data: the canaries, each repeated {canaries['repetitions']} times, were "
            "memorised; a repeated record is protected only by group privacy."
        )
    if level != "low":
        tips.append(
            "Use larger local batches (train.batch_size): each example weighs less in an update, DP noise "
            "per example falls, and gradient inversion must untangle more sequences at once."
        )
    if (variant.get("attacks") or {}).get("status") == "ran" and _token_recall(variant) >= 0.2:
        tips.append(
            "Change the update path: projected updates (federation.codec = 'projection') defeated the "
            "span attacks in fedpeft's measurements, though they are no guarantee (random masks and "
            "top-k did not: the server knows which entries it got); FFA-LoRA (adapter.freeze_lora_a) "
            "sends no A gradients at all."
        )
    if not tips:
        tips.append("Nothing to change for these measurements; keep auditing when data or settings change.")
    return tips


def overall_verdict(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Every variant's verdict and a one-paragraph comparison."""
    verdicts = [variant_verdict(v) for v in variants]
    parts = []
    for verdict, variant in zip(verdicts, variants, strict=True):
        parts.append(
            f"{variant['name']}: {verdict['level']} risk ({verdict['guarantee']}; "
            f"test accuracy {variant['utility']['accuracy']:.3f})"
        )
    return {"summary": "; ".join(parts) + ".", "variants": verdicts}
