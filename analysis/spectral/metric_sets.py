"""Metric sets (SPEC §8): which SPEC §3 columns a scan or delta reports, and which groups of work they need.

A set is `all` (every §3 metric), `fit` (norms, ranks and the power-law fit: what WeightWatcher's
`analyze()` computes by default) or a comma list of §3 column names. The engine computes GROUPS, never
single columns: a group is one piece of work (the power-law xmin scan, the TPL/exponential tail fits, the
permuted null's eigensolve + MP edge, …). Only the MP group and W₁ need the permuted null. A number
depends only on the eigenvalues and the route (a `SpectralSettings` field), never on the set, so cache
entries hold whole groups and are shared by every set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from analysis.errors import DiffractError

# group → its columns, in the order rows carry them
GROUPS: dict[str, tuple[str, ...]] = {
    "norms": ("esd_n", "lambda_max", "lambda_min", "esd_mean", "esd_std", "esd_n_clipped", "frob_norm",
              "nuclear_norm", "l2_norm", "log_norm", "log_spectral_norm"),
    "ranks": ("stable_rank", "effective_rank", "hard_rank"),
    "pl": ("pl_alpha", "pl_esd_xmin", "pl_ks", "pl_n_tail", "pl_alpha_weighted", "pl_alpha_reliable",
           "fit_reliable", "fit_warning"),
    "tails": ("tpl_alpha", "tpl_lambda", "tpl_esd_xmin", "tpl_ks", "expon_lambda", "expon_esd_xmin", "expon_ks",
              "pl_tpl_llr", "pl_tpl_p", "shape"),
    "mp": ("mp_esd_max", "mp_esd_min", "mp_bulk_std", "mp_bulk_var", "mp_num_spikes", "mp_ks", "mp_soft_rank"),
    "tw": ("tw_esd_bound", "tw_num_spikes"),
    "w1": ("w1_rand_distance",),
}
# a group's computation reads another group's results: tails start from the PL fit, TW uses MP's bulk variance
REQUIRES: dict[str, tuple[str, ...]] = {"tails": ("pl",), "tw": ("mp",)}
NULL_GROUPS = frozenset({"mp", "w1"})     # the permuted null's eigensolve (MP re-estimate, null spikes, W₁)
NAMED_SETS: dict[str, tuple[str, ...]] = {"all": tuple(GROUPS), "fit": ("norms", "ranks", "pl")}
METRIC_COLUMNS: tuple[str, ...] = tuple(c for cols in GROUPS.values() for c in cols)
_GROUP_OF: dict[str, str] = {c: g for g, cols in GROUPS.items() for c in cols}


@dataclass(frozen=True)
class MetricSet:
    """A resolved metric set: its canonical name, the columns it reports and the groups that compute them."""

    name: str
    columns: tuple[str, ...]
    groups: frozenset[str]

    @property
    def needs_null(self) -> bool:
        """True when the permuted null model's eigensolve is needed (MP, TW, W₁)."""
        return bool(self.groups & NULL_GROUPS)

    @property
    def is_all(self) -> bool:
        return set(self.columns) == set(METRIC_COLUMNS)

    def covered_by(self, metrics: Mapping[str, Any]) -> bool:
        """True when `metrics` (e.g. a cache entry) already holds every column this set reports."""
        return all(c in metrics for c in self.columns)

    def project(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """`row` cut to this set: its other (non-§3) columns in their order, then the set's §3 columns that it
        holds in canonical order — so a cache entry widened group by group gives the columns of a fresh one."""
        out = {k: v for k, v in row.items() if k not in _GROUP_OF}
        out.update((c, row[c]) for c in self.columns if c in row)
        return out


def _closure(groups: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    todo = list(groups)
    while todo:
        g = todo.pop()
        if g not in out:
            out.add(g)
            todo.extend(REQUIRES.get(g, ()))
    return frozenset(out)


def valid_names() -> str:
    """The accepted words of --metrics, for a usage line."""
    return f"{', '.join(NAMED_SETS)} or a comma list of: {', '.join(METRIC_COLUMNS)}"


def metric_set(spec: "str | MetricSet | None") -> MetricSet:
    """The MetricSet of `spec`: None/'all', 'fit', or a comma list of §3 names; unknown names are one error."""
    if isinstance(spec, MetricSet):
        return spec
    text = (spec or "all").strip()
    if text in NAMED_SETS:
        groups = NAMED_SETS[text]
        return MetricSet(text, tuple(c for g in GROUPS if g in groups for c in GROUPS[g]), _closure(groups))
    words = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in words if w not in _GROUP_OF and w not in NAMED_SETS]
    if not words or unknown:
        what = f"unknown metric(s) {', '.join(map(repr, unknown))}" if unknown else "no metric named"
        raise DiffractError(f"{what} in --metrics {text!r}", hint=f"use {valid_names()}")
    asked: set[str] = set()
    for w in words:
        asked.update(METRIC_COLUMNS if w == "all" else
                     (c for g in NAMED_SETS[w] for c in GROUPS[g]) if w in NAMED_SETS else (w,))
    columns = tuple(c for c in METRIC_COLUMNS if c in asked)
    name = next((n for n, gs in NAMED_SETS.items()
                 if set(columns) == {c for g in gs for c in GROUPS[g]}), ",".join(columns))
    return MetricSet(name, columns, _closure(_GROUP_OF[c] for c in columns))


ALL = metric_set("all")

# groups the float32-Gram route computes to ≤ 1.5e-5 relative of the float64 Gram on trained, full-rank weights
# (tests/test_metric_sets.py::test_gram32_fit_agrees_with_gram64_on_real_matrices and ..._on_a_1b_wide_matrix;
# λ_min is left empty below that route's resolution) — not the tails (the TPL's λ moved by 1.05e-4 on the
# 1B-shaped Llama's v_proj)
FLOAT32_GRAM_GROUPS = frozenset({"norms", "ranks", "pl"})


def default_route(metrics: "str | MetricSet | None", deltas: bool = False) -> str:
    """The eigen route when none is asked: the float32 Gram ("gram32", its Gram ≈2× faster) for a weights-only scan
    whose set needs nothing beyond norms, ranks and the power-law fit (`fit`), else the float64 Gram — a
    ΔW is often low-rank, and the float32 Gram cannot resolve the bottom of its spectrum."""
    if deltas:
        return "gram64"
    return "gram32" if metric_set(metrics).groups <= FLOAT32_GRAM_GROUPS else "gram64"
