"""Few-step quality: a distilled LCM student against its teacher, on the digits metrics.

For each guidance scale, the teacher (a ``train.ldm`` workdir) samples with DPM-Solver++ (2M, the
``dpm_solver`` defaults) at ``--teacher_steps`` and the student (a ``train.lcm`` workdir of that
teacher) with multistep consistency sampling at ``--student_steps``. Both load with
``StableDiffusion.from_workdir``; every row is scored by :func:`jdiff.evaluation.evaluate_digits`
(independent classifier accuracy, Frechet distance of 8x8 pixel features)
on the same prompts and seed, with the generation wall time per image (batch 100, compile
excluded), all in one process so the timings are side by side.

    python -m bench.lcm --teacher workdir/ldm_digits --student workdir/lcm_digits [--guidance 3,5] [--out f.json]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from bench import _timing

__all__ = ["run", "main"]

COLUMNS = ["model", "sampler", "steps", "guidance", "accuracy", "frechet", "ms/image"]


def run(teacher: str, student: str, *, teacher_steps: Sequence[int] = (4, 10, 25),
        student_steps: Sequence[int] = (1, 2, 4, 8), guidances: Sequence[float] = (3.0, 5.0),
        per_digit: int = 20, seed: int = 0, log=print) -> list[dict[str, Any]]:
  """Rows ``{"model", "sampler", "steps", "guidance", "accuracy", "frechet", "ms/image"}``."""
  from jdiff.evaluation import evaluate_digits
  from jdiff.pipelines import StableDiffusion

  teacher_pipe, student_pipe = StableDiffusion.from_workdir(teacher), StableDiffusion.from_workdir(student)
  rows = []
  for g in guidances:
    for n in teacher_steps:
      r = evaluate_digits(teacher_pipe, per_digit=per_digit, guidance_scale=g, num_steps=n, sampler="dpm_solver",
                          seed=seed)
      rows.append({"model": "teacher", "sampler": "dpm_solver++ 2M", "steps": n, "guidance": g,
                   "accuracy": r["accuracy"], "frechet": r["frechet_distance"],
                   "ms/image": 1e3 * r["seconds_per_image"]})
      log(rows[-1])
    for n in student_steps:
      r = evaluate_digits(student_pipe, num_steps=n, per_digit=per_digit, guidance_scale=g, sampler="lcm", seed=seed)
      rows.append({"model": "lcm", "sampler": "lcm", "steps": n, "guidance": g, "accuracy": r["accuracy"],
                   "frechet": r["frechet_distance"], "ms/image": 1e3 * r["seconds_per_image"]})
      log(rows[-1])
  return rows


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m bench.lcm", description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, help="train.ldm workdir")
  p.add_argument("--student", required=True, help="train.lcm workdir distilled from --teacher")
  p.add_argument("--teacher_steps", default="4,10,25")
  p.add_argument("--student_steps", default="1,2,4,8")
  p.add_argument("--guidance", default="3,5", help="comma-separated guidance scales")
  p.add_argument("--per_digit", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="bench_lcm.json")
  args = p.parse_args(argv)
  rows = run(args.teacher, args.student, teacher_steps=_ints(args.teacher_steps),
             student_steps=_ints(args.student_steps), guidances=[float(x) for x in args.guidance.split(",")],
             per_digit=args.per_digit, seed=args.seed, log=lambda r: print(r, file=sys.stderr, flush=True))
  _timing.write_json(args.out, {"benchmark": "lcm", "environment": _timing.environment(), "teacher": args.teacher,
                                "student": args.student, "results": rows})
  print(_timing.format_table(rows, COLUMNS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
