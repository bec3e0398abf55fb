"""The toy world: chained arithmetic written out one step at a time.

A problem is a chain such as ``37+48-19+25``. Its solution applies the operations left to right,
each step reusing the previous result, then states the answer::

    37+48=85;85-19=66;66+25=91;A=91

An early slip therefore makes every later step wrong while staying locally consistent, which is
the setting in which a teacher that is conditioned on the slip keeps agreeing with the student.

Two worlds are built from the same problems:

- ``plain``: one way to write each step (the line above). Teacher and student then agree almost
  everywhere on correct solutions too, so low KL says nothing about whether a rollout is healthy.
- ``rich``: each step has equivalent spellings, an operand order (``85-19=66`` or ``-19+85=66``)
  and a separator (``;`` or ``,``), and the teacher's and the student's training data prefer
  opposite ones. Benign agreement then carries moderate KL. A small share of training sequences
  also degenerate: from some step on, that step repeats verbatim until the length limit, with no
  answer. A model conditioned on an established repetition continues it almost deterministically,
  so KL inside a repetition is close to zero.
- ``sticky``: the premise made true by construction. The teacher is the rich world's, fine-tuned on
  repetitions whose loss starts at their second repeated copy: it learns to continue a loop once
  one is established (as language models do), not to enter one. The student's repetitions escape:
  a step is repeated once or twice and the solution then goes on to its answer. Inside a loop the
  teacher therefore agrees with repeating and disagrees with the student's escape.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

# Spellings of one step (r op b = c), r the running result, b the next operand from the prompt.
FORMS = ("fwd", "swap")
SEPS = (";", ",")
ANSWER_PREFIX = "A="
MAX_COMPLETION_CHARS = 96  # one character is one token; repetitions run to this length


@dataclass(frozen=True)
class WorldSpec:
    """How solutions are written in one world, for one of the two models' training data."""

    name: str
    p_fwd: float  # probability of the operand order r op b (else the swapped order)
    p_semicolon: float  # probability of ';' as the step separator (else ',')
    p_repeat: float  # share of sequences that degenerate into a repeated step
    p_escape: float = 0.0  # share of those repetitions that stop after 1-2 copies and go on to the answer
    loop_loss_only: bool = False  # a repetition carries loss from its second repeated copy on (SFT data)

    def __post_init__(self) -> None:
        for field in ("p_fwd", "p_semicolon", "p_repeat", "p_escape"):
            v = getattr(self, field)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"WorldSpec.{field} must lie in [0, 1], got {v}")


# (teacher data, student data) for each world. In `rich` the two models learn opposite
# preferences between equivalent spellings, and the student's data degenerates more often,
# as a weaker model's does.
WORLDS: dict[str, tuple[WorldSpec, WorldSpec]] = {
    "rich": (
        WorldSpec("rich", p_fwd=0.75, p_semicolon=0.75, p_repeat=0.03),
        WorldSpec("rich", p_fwd=0.25, p_semicolon=0.25, p_repeat=0.12),
    ),
    "plain": (
        WorldSpec("plain", p_fwd=1.0, p_semicolon=1.0, p_repeat=0.0),
        WorldSpec("plain", p_fwd=1.0, p_semicolon=1.0, p_repeat=0.0),
    ),
    # The rich world with a student whose data degenerates three times as often (36% vs 12%): its
    # repetition takes on-policy distillation longer to remove (the persistent-trap regime). The
    # teacher is the rich world's
    # (`python -m experiments toy build --world repeat --teacher-from kat/toy/rich/teacher`).
    "repeat": (
        WorldSpec("rich", p_fwd=0.75, p_semicolon=0.75, p_repeat=0.03),
        WorldSpec("rich", p_fwd=0.25, p_semicolon=0.25, p_repeat=0.36),
    ),
    # Both models fine-tuned (experiments/toy_build.py FINE_TUNE): the teacher from the rich world's on
    # loop continuations, the student from the repeat world's on repetitions that escape.
    "sticky": (
        WorldSpec("rich", p_fwd=0.75, p_semicolon=0.75, p_repeat=0.3, loop_loss_only=True),
        WorldSpec("rich", p_fwd=0.25, p_semicolon=0.25, p_repeat=0.36, p_escape=1.0),
    ),
}


def world_specs(world: str) -> tuple[WorldSpec, WorldSpec]:
    """(teacher spec, student spec) of a named world."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {sorted(WORLDS)}")
    return WORLDS[world]


@dataclass(frozen=True)
class Problem:
    """``numbers[0] ops[0] numbers[1] ops[1] ...`` evaluated left to right."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def prompt(self) -> str:
        out = str(self.numbers[0])
        for op, b in zip(self.ops, self.numbers[1:]):
            out += f"{op}{b}"
        return out

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(r, op, b, c) for each step: c = r + b or r - b, r the previous step's c."""
        out, r = [], self.numbers[0]
        for op, b in zip(self.ops, self.numbers[1:]):
            c = r + b if op == "+" else r - b
            out.append((r, op, b, c))
            r = c
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]


def parse_prompt(prompt: str) -> Problem:
    """Inverse of ``Problem.prompt``: ``'37+48-19'`` -> Problem((37, 48, 19), ('+', '-'))."""
    if not re.fullmatch(r"\d+([+-]\d+)+", prompt):
        raise ValueError(f"toy prompt must look like '37+48-19', got {prompt!r}")
    numbers = tuple(int(x) for x in re.findall(r"\d+", prompt))
    ops = tuple(re.findall(r"[+-]", prompt))
    return Problem(numbers, ops)


def sample_problem(rng: random.Random, min_ops: int = 3, max_ops: int = 5, digits: int = 2) -> Problem:
    """A random chain of ``min_ops..max_ops`` operations on ``digits``-digit operands.

    A subtraction that would make the running result negative becomes an addition, so every
    intermediate result is a non-negative integer.
    """
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={min_ops}, max_ops={max_ops}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    n_ops = rng.randint(min_ops, max_ops)
    numbers, ops = [rng.randint(lo, hi)], []
    r = numbers[0]
    for _ in range(n_ops):
        b = rng.randint(lo, hi)
        op = rng.choice("+-")
        if op == "-" and r - b < 0:
            op = "+"
        r = r + b if op == "+" else r - b
        numbers.append(b)
        ops.append(op)
    return Problem(tuple(numbers), tuple(ops))


def write_step(r: int, op: str, b: int, c: int, form: str) -> str:
    """One step without separator. ``fwd``: ``85-19=66``; ``swap``: ``-19+85=66`` / ``19+85=104``."""
    if form == "fwd":
        return f"{r}{op}{b}={c}"
    if form == "swap":
        return f"{b}+{r}={c}" if op == "+" else f"-{b}+{r}={c}"
    raise ValueError(f"unknown step form {form!r}; choose one of {FORMS}")


def write_solution(problem: Problem, spec: WorldSpec, rng: random.Random,
                   max_chars: int = MAX_COMPLETION_CHARS) -> tuple[str, bool]:
    """A solution in the style of ``spec``: (text, ends_with_eos).

    A degenerate sample repeats one of its steps verbatim up to ``max_chars`` characters and
    has no answer and no end of sequence; a healthy one ends with ``A=<answer>`` and EOS. An escaping
    repetition (``spec.p_escape``) repeats its step once or twice, as far as the answer still fits,
    and then goes on as a healthy sample does.
    """
    steps = problem.steps()
    repeat_at = rng.randrange(len(steps)) if rng.random() < spec.p_repeat else None
    escape = repeat_at is not None and spec.p_escape > 0 and rng.random() < spec.p_escape  # no draw otherwise
    copies = rng.randint(1, 2) if escape else 0
    pieces = []
    for i, step in enumerate(steps):
        form = "fwd" if rng.random() < spec.p_fwd else "swap"
        sep = ";" if rng.random() < spec.p_semicolon else ","
        pieces.append(write_step(*step, form) + sep)
        if i == repeat_at and not escape:
            text = "".join(pieces)
            while len(text) < max_chars:
                text += pieces[-1]
            return text[:max_chars], False
    answer = f"{ANSWER_PREFIX}{problem.answer}"
    if escape:  # the copies go after the repeated step, as many as still leave room for the answer
        piece = pieces[repeat_at]
        room = max_chars - sum(map(len, pieces)) - len(answer)
        pieces.insert(repeat_at + 1, piece * min(copies, max(room, 0) // len(piece)))
    text = "".join(pieces) + answer
    if len(text) > max_chars:
        raise ValueError(f"solution of {problem.prompt} is {len(text)} characters, over max_chars="
                         f"{max_chars}; use fewer operations or digits")
    return text, True


# ---------------------------------------------------------------------------------------------
# Answers and grading

_ANSWER_RE = re.compile(r"A=(-?\d+)")


def extract_answer(completion: str) -> str | None:
    """The integer after the last ``A=`` as a string, or None if there is none."""
    found = _ANSWER_RE.findall(completion)
    return str(int(found[-1])) if found else None


def grade(completion: str, answer: str) -> bool:
    """True when the extracted final answer equals ``answer`` as an integer: the ``exact`` grader of
    kat.evaluate (Config.grader). A completion without a parsable answer is wrong."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    try:
        return int(pred) == int(str(answer).strip())
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Where a rollout goes wrong (for the KL statistics)

@dataclass(frozen=True)
class Trace:
    """Character positions in a completion (one character is one token)."""

    correct: bool
    first_error: int | None  # first character no valid solution has here; None if none
    repeat_start: int | None  # start of the first verbatim repeat of the previous step
    repeat_len: int  # length of the repeated step (0 without repetition)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trace(completion: str, problem: Problem) -> Trace:
    """Locate the first error and the first repetition in a completion (eos already stripped).

    Every spelling of every world is accepted as valid. A step counts as a repetition when it
    equals the step before it character for character, including its separator; a repeated step
    is also an error, since a valid next step always has a different result.
    """
    pos, first_error = 0, None
    for step in problem.steps():
        options = [write_step(*step, f) + s for f in FORMS for s in SEPS]
        hit = next((o for o in options if completion.startswith(o, pos)), None)
        if hit is None:
            first_error = pos + max(_common_prefix(completion[pos:], o) for o in options)
            break
        pos += len(hit)
    else:
        final = f"{ANSWER_PREFIX}{problem.answer}"
        n = _common_prefix(completion[pos:], final)
        if n < len(final):
            first_error = pos + n
        elif len(completion) > pos + n:  # anything after the answer instead of EOS
            first_error = pos + n
    repeat_start, repeat_len = find_repeat(completion)
    ok = grade(completion, str(problem.answer))
    return Trace(ok, first_error, repeat_start, repeat_len)


def find_repeat(completion: str) -> tuple[int | None, int]:
    """Start and length of the first separator-terminated segment equal to the one before it."""
    segments = re.findall(r"[^;,]*[;,]", completion)
    pos = 0
    for i, seg in enumerate(segments):
        if i > 0 and seg == segments[i - 1] and len(seg) > 1:
            return pos, len(seg)
        pos += len(seg)
    return None, 0


# ---------------------------------------------------------------------------------------------
# Prompt files

def make_split(n: int, seed: int, exclude: set[str] = frozenset(), **difficulty) -> list[dict]:
    """``n`` distinct problems as ``{"prompt", "answer"}`` rows, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        p = sample_problem(rng, **difficulty)
        if p.prompt in seen:
            continue
        seen.add(p.prompt)
        rows.append({"prompt": p.prompt, "answer": str(p.answer)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def trap_start(completion: str, problem: Problem) -> int | None:
    """The ground-truth start of the trap in a completion (eos stripped): the first error or the start
    of the first verbatim repeat, whichever comes first; None for a complete, valid solution.

    ``len(completion)`` means the text is a valid prefix and the error is what comes after it: an
    eos where a valid solution goes on, or, for a rollout cut off by the length limit, nothing yet.
    """
    t = trace(completion, problem)
    found = [p for p in (t.first_error, t.repeat_start) if p is not None]
    return min(found) if found else None


def oracle_cut(completion: str, problem: Problem, ended: bool) -> int | None:
    """First position the oracle excludes from the loss: one past the trap start, or None.

    The token at the trap start was produced from a valid prefix, so the teacher's view of it is the
    correction and it stays in the loss; every later token is conditioned on the broken prefix and
    leaves. `ended`: the completion ended with eos (a premature eos is itself the error token, at
    position len(completion)); without it a completion that is only cut short by the length limit
    on a valid path is not cut.
    """
    start = trap_start(completion, problem)
    if start is None or (start == len(completion) and not ended):
        return None
    return start + 1
