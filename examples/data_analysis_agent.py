"""A data-analysis agent that keeps its assumptions and observations in a δ-mem session across a multi-step task.

    python examples/data_analysis_agent.py --store sqlite:////tmp/demo.db

The analysis itself is plain Python over a small inline sales table. After each step the agent records what it
assumed and observed as messages of the session (``engine.write``), and asks the model for a one-line note on
the next step. In ``windowed`` mode only the most recent messages stay in the prompt as text (``--window-tokens``
is small on purpose), so the early assumptions survive only in the state. The last step asks the model to list
the assumptions; the final report printed by the script comes from the agent's own record, and the model's
answer is shown beside it — with the embedded 135M model and an untrained adapter expect the model's list to be
incomplete or wrong: that is what the evaluation (docs/evaluation.md) measures, not something this demo hides.

Run it again with the same ``--store``: the session continues (its turn count grows) instead of starting over.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, parser  # noqa: E402

SALES = [  # region, month, units, unit_price
    ("north", "2024-01", 120, 9.5), ("north", "2024-02", 135, 9.5), ("north", "2024-03", 0, 9.5),
    ("south", "2024-01", 80, 11.0), ("south", "2024-02", 95, 11.0), ("south", "2024-03", 101, 10.5),
    ("west", "2024-01", 60, 12.0), ("west", "2024-02", 58, 12.0), ("west", "2024-03", 75, 12.0),
]


def steps() -> list[tuple[str, str]]:
    """(assumption, observation) per analysis step, computed from the data."""
    out = []
    zero = [(r, m) for r, m, u, _ in SALES if u == 0]
    out.append(("A zero in 'units' means a missing report, not zero sales.",
                f"Rows with zero units: {zero}; they are excluded from averages."))
    rows = [s for s in SALES if s[2] > 0]
    revenue: dict[str, float] = {}
    for region, _, units, price in rows:
        revenue[region] = revenue.get(region, 0.0) + units * price
    best = max(revenue, key=revenue.get)
    out.append(("Revenue is units times unit_price; prices are in euros.",
                "Revenue by region: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(revenue.items()))
                + f"; highest: {best}."))
    mean_units = statistics.mean(u for _, _, u, _ in rows)
    out.append(("Months are comparable (no seasonality correction).",
                f"Mean monthly units over reported rows: {mean_units:.1f}."))
    south = [u for r, _, u, _ in rows if r == "south"]
    out.append(("A price cut is the only change in the south in March.",
                f"South units went {south[0]} -> {south[-1]} while its price fell from 11.0 to 10.5."))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--session", default="data-analysis")
    p.add_argument("--window-tokens", type=int, default=96, help="text window of windowed mode (small on purpose)")
    args = p.parse_args(argv)

    from deltamem_agents import MemoryEngine

    with MemoryEngine(args.model, adapter=args.adapter, store=args.store, window_tokens=args.window_tokens) as eng:
        print(f"model {eng.model_name}; {describe(eng, args.session)}")
        eng.write(args.session, [{"role": "system", "content": "You are a careful data analyst. Keep track of "
                                  "every assumption and observation."}], history="append")
        for i, (assumption, observation) in enumerate(steps(), 1):
            eng.write(args.session, [{"role": "user", "content": f"Step {i}. Assumption: {assumption} "
                                      f"Observation: {observation}"}], history="append")
            note = eng.chat(args.session, [{"role": "user", "content": "In one line: what should we check next?"}],
                            history="append", max_new_tokens=args.max_new_tokens)
            print(f"step {i}: {observation}\n  model's next-step note: {note.text.strip()!r}")
        final = eng.chat(args.session, [{"role": "user", "content": "List the assumptions we made so far."}],
                         history="append", max_new_tokens=args.max_new_tokens)
        print("\nmodel's list of assumptions (windowed: the early ones are outside the text window):")
        print(f"  {final.text.strip()!r}")
        print(f"  prompt tokens {final.usage.prompt_tokens} vs full context {final.usage.full_context_tokens}")
        print("\nthe agent's own record of assumptions:")
        for i, (assumption, _) in enumerate(steps(), 1):
            print(f"  {i}. {assumption}")
        print(describe(eng, args.session))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
