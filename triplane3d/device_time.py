"""Where a step's device time goes: a `jax.profiler` trace summarised by model part.

`python -m triplane3d.benchmark --profile=DIR` traces a few train steps after timing them and
reports, per step: the kernels the device ran, the time they kept it busy (the union of their
intervals over all streams) against the span from the first to the last (a busy share well
below 1 means the host, not the device, sets the pace: launches, transfers), the busy time per
model part, and the most expensive ops.

A kernel is attributed through its `hlo_op` stat (the HLO instruction the runtime launched)
and that instruction's `op_name` metadata in the compiled module, which holds JAX's name stack:
the renderer runs under `jax.named_scope('render')`, the teacher under 'teacher', the objective
under 'loss', the optimiser under 'optimizer'; the student's ViT and the decoder are named by
their Flax modules. Ops of the backward pass carry `transpose(` in their name stack; the
forward that a rematerialised (`jax.checkpoint`) region recomputes in the backward pass also
carries `rematted_computation`, and is labelled 'recompute'. Collectives are 'collectives'
(XLA merges a step's gradient all-reduces into one, whose op_name lists all of theirs).

Where ops are read: on a GPU its device plane's stream lines (the kernels, memsets and copies
the device ran), on a TPU its 'XLA Ops' line. XLA:CPU has no device plane: it runs a program
as a sequence of thunks on its host threads, and records each one (an event with an `hlo_op`
stat on the thread's line of the '/host:CPU' plane) only in a program compiled with
`CPU_TRACE_OPTIONS`, which `benchmark --profile` compiles for the trace (the timed program is
the plain one). On CPU a loop's or a conditional's thunk encloses its body's, so only the
innermost ops are counted, and XLA runs independent ops at the same time on its threads: an
interval that k ops share counts 1/k to each, so that the parts add up to the busy time (a
device's kernels are counted whole: its streams rarely overlap). The instrumented program is
as fast as the plain one, but recording each event costs the CPU tracer some µs inside the op
it traces: a step of many small ops reads slower traced (docs/performance.md).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax

# (part, pattern in the op's name stack); the first match wins, so 'render' (the renderer,
# called from inside the decoder's module path) is tested before the decoder.
CATEGORIES = (
  ('renderer', re.compile(r'\brender\b')),
  ('teacher', re.compile(r'\bteacher\b')),
  ('loss', re.compile(r'\bloss\b')),
  ('optimizer', re.compile(r'\boptimizer\b')),
  ('decoder', re.compile(r'Decoder')),
  ('backbone', re.compile(r'DinoViT')),
)
# XLA:CPU's per-thunk trace events (`jax.jit(...).lower(...).compile(compiler_options=...)`).
CPU_TRACE_OPTIONS = {'xla_cpu_enable_xprof_traceme': True}
# `%name = type opcode(%operand, ...), calls=%computation, metadata={op_name="..." ...}` in
# `Compiled.as_text()` (the type may be a tuple, `(f32[2]{0}, s32[])`).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_OP_NAME = re.compile(r'\bop_name="([^"]*)"')
# XLA merges a step's gradient all-reduces into one whose op_name lists all of theirs.
_COLLECTIVE = re.compile(r'(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)')


def category(op_name: str) -> str:
  """The model part of a name stack, with ' recompute' for the forward a remat region
  recomputes in the backward pass and ' bwd' for the rest of it ('other' if no part)."""
  part = next((p for p, pattern in CATEGORIES if pattern.search(op_name)), 'other')
  if 'rematted_computation' in op_name:
    return part + ' recompute'
  return part + (' bwd' if 'transpose(' in op_name else '')


def _op_lines(plane) -> list:
  """The lines of a device plane that hold its ops once: a GPU's 'Stream #…' lines (its
  'XLA Ops' / 'XLA Modules' / 'Steps' lines, where present, repeat them), else a TPU's
  'XLA Ops' line, else every line."""
  lines = list(plane.lines)
  streams = [ln for ln in lines if ln.name.startswith('Stream')]
  return streams or [ln for ln in lines if ln.name == 'XLA Ops'] or lines


def _opcode_and_operands(rest: str) -> tuple[str, list[str]]:
  """'type opcode(%a, %b), attributes' → ('opcode', ['a', 'b'])."""
  depth, cut = 0, len(rest)
  for i, ch in enumerate(rest):
    depth += (ch == '(') - (ch == ')')
    if ch == ' ' and depth == 0:  # The end of the type.
      cut = i
      break
  opcode, _, args = rest[cut + 1 :].partition('(')
  return opcode, re.findall(r'%([\w.\-]+)', args.split(')')[0])


def _instructions(hlo_text: str):
  """(name, opcode, operand names, op_name or None) of each instruction of `hlo_text`; a
  parameter's op_name (its argument's path) is None."""
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name, rest = m.groups()
      opcode, operands = _opcode_and_operands(rest)
      named = _OP_NAME.search(rest)
      yield name, opcode, operands, named.group(1) if named and opcode != 'parameter' else None


# Name-stack segments that say how, not where: jit, autodiff, loops, conditionals, remat.
_WRAPPER = re.compile(r'^(?:jit\(.*\)|cond|branch_\d+_fun|while|body|closed_call|checkpoint|'
                      r'rematted_computation|vmap\(\)|jvp\(\)|transpose\(jvp\(\)\))$')  # fmt: skip


def short_scope(op_name: str) -> str:
  """JAX's name stack without its wrappers: 'jit(train_step)/transpose(jvp(TriplaneDecoder))/
  up1/conv/cond/branch_0_fun/transpose(jvp())/conv_general_dilated' →
  'TriplaneDecoder/up1/conv/conv_general_dilated'."""
  kept = []
  for seg in op_name.split('/'):
    while (m := re.fullmatch(r'(?:transpose|jvp|vmap)\((.+)\)', seg)) is not None:
      seg = m.group(1)
    if seg and not _WRAPPER.match(seg):
      kept.append(seg)
  return '/'.join(kept)


def op_categories(hlo_text: str) -> dict[str, str]:
  """HLO instruction name → `category` of its op_name; collectives → 'collectives'. An
  instruction without an op_name (a layout copy or transpose that XLA inserted, a tuple; a
  parameter's is its argument's path) takes the part of the nearest named op it feeds (the op
  it was made for), else of the nearest it is fed by."""
  return _categories(list(_instructions(hlo_text)))


def _categories(instructions: list[tuple[str, str, list[str], str | None]]) -> dict[str, str]:
  """`op_categories` of `_instructions`' output."""
  out, operands = {}, {}
  for name, opcode, ins, op_name in instructions:
    operands[name] = ins
    if _COLLECTIVE.match(opcode):
      out[name] = 'collectives'
    elif op_name is not None:
      out[name] = category(op_name)
  users = collections.defaultdict(list)
  for name, ins in operands.items():
    for operand in ins:
      users[operand].append(name)
  # Breadth-first from the named ops to the unnamed ops they read, then from every op with a
  # part to the unnamed ops that read it; again while that reaches more (an unnamed operand of
  # an op that got its part from its own operand).
  known = -1
  while known < len(out):
    known = len(out)
    for neighbours in (operands, users):
      queue = collections.deque(out)
      while queue:
        name = queue.popleft()
        for n in neighbours.get(name, ()):
          if n not in out:
            out[n] = out[name]
            queue.append(n)
  return out


def _union_ns(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float('-inf')
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def _device_ops(data: jax.profiler.ProfileData) -> tuple[list[tuple[str, float, float]], set]:
  """(op, start ns, duration ns) of every kernel on the device planes (module docstring), and
  the names of the stats they carry."""
  out, stat_names = [], set()
  for plane in data.planes:
    if not plane.name.startswith('/device:'):
      continue
    for line in _op_lines(plane):
      for event in line.events:
        stats = dict(event.stats)
        stat_names.update(stats)
        op = str(stats.get('hlo_op') or event.name)
        if op.startswith('command_buffer'):  # A CUDA graph of many ops: name the kernel.
          op = event.name
        out.append((op, event.start_ns, event.duration_ns))
  return out, stat_names


def _cpu_ops(data: jax.profiler.ProfileData) -> list[list[tuple[str, float, float]]]:
  """Per host thread, (op, start ns, duration ns) of the innermost XLA:CPU thunks: events
  with an `hlo_op` stat that enclose no other such event of their thread (a loop's or a
  conditional's thunk encloses its body's)."""
  threads = []
  for plane in data.planes:
    if plane.name != '/host:CPU':
      continue
    for line in plane.lines:
      events = []
      for event in line.events:
        op = dict(event.stats).get('hlo_op')
        if op is not None:
          events.append((str(op), event.start_ns, event.duration_ns))
      events.sort(key=lambda e: (e[1], -e[2]))  # An enclosing event before what it holds.
      outer, open_ = [False] * len(events), []  # open_: indices of the events still running.
      for i, (_, start, dur) in enumerate(events):
        while open_ and events[open_[-1]][1] + events[open_[-1]][2] <= start:
          open_.pop()
        if dur > 0:  # An op of no length (a bitcast) encloses nothing and is in nothing.
          if open_:
            outer[open_[-1]] = True
          open_.append(i)
      kept = [e for e, o in zip(events, outer, strict=True) if not o]
      if kept:
        threads.append(kept)
  return threads


def _shared_ns(threads: list[list[tuple[str, float, float]]]) -> list[float]:
  """Per event (threads' events in order): its duration, an interval shared with k − 1 other
  running events counting 1/k."""
  flat = [e for t in threads for e in t]
  # At equal times starts come first, so that an event of zero duration also ends.
  points = sorted(
    [(s, 0, i) for i, (_, s, _) in enumerate(flat)]
    + [(s + d, 1, i) for i, (_, s, d) in enumerate(flat)]
  )
  share, active, last = [0.0] * len(flat), set(), None
  for t, ends, i in points:
    if active and t > last:
      for j in active:
        share[j] += (t - last) / len(active)
    last = t
    (active.discard if ends else active.add)(i)
  return share


def summarize(
  data: jax.profiler.ProfileData, categories: dict[str, str], steps: int, top: int = 20
) -> dict[str, Any]:
  """Per-step device time of a trace of `steps` steps (module docstring): a device's kernels,
  or where the trace has none, XLA:CPU's thunks on the host threads.

  Args:
    data: the trace (`jax.profiler.ProfileData`).
    categories: `op_categories` of the traced program.
    steps: how many steps the trace holds (the totals are divided by it).
    top: how many ops to list, most time first.

  Returns:
    {'source' ('device', 'host threads' or None: no ops), 'kernels_per_step' (ops run),
     'device_busy_s_per_step', 'device_span_s_per_step', 'device_busy_share',
     'by_part_s_per_step' {part: s}, 'top_ops' [[op, part, kernels per step, s per step], ...],
     'ops' {op: [part, kernels, s] per step, every op}, 'kernel_stats' [the stat names the
     device's kernels carried]}.
  """
  (events, stat_names), source = _device_ops(data), 'device'
  times = [d for _, _, d in events]
  if not events:
    threads = _cpu_ops(data)
    events = [e for t in threads for e in t]
    times, source = _shared_ns(threads), 'host threads' if events else None
  ops = collections.defaultdict(lambda: [0, 0.0])  # op → [kernels, ns]
  for (op, _, _), ns in zip(events, times, strict=True):
    ops[op][0] += 1
    ops[op][1] += ns
  intervals = [(start, start + dur) for _, start, dur in events]
  # A kernel without an hlo_op stat, or launched from a command buffer (XLA:GPU replays most
  # of a step as CUDA graphs), is named after its fusion, '.' and '-' spelt '_'
  # (%loop_add_fusion.13 → loop_add_fusion_13). Library kernels (cuBLAS 'nvjet_*', cuDNN)
  # inside a command buffer name no HLO op: 'unattributed'.
  spelt = {re.sub(r'[.\-]', '_', op): part for op, part in categories.items()}
  part_of = lambda op: categories.get(op) or spelt.get(op, 'unattributed')  # noqa: E731
  by_part = collections.Counter()
  for op, (_, ns) in ops.items():
    by_part[part_of(op)] += ns
  span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
  busy = _union_ns(intervals)
  ranked = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
  return {
    'source': source,
    'kernels_per_step': sum(n for n, _ in ops.values()) / steps,
    'device_busy_s_per_step': busy * 1e-9 / steps,
    'device_span_s_per_step': span * 1e-9 / steps,
    'device_busy_share': busy / span if span else None,
    'by_part_s_per_step': {p: ns * 1e-9 / steps for p, ns in by_part.most_common()},
    'top_ops': [[op, part_of(op), n / steps, ns * 1e-9 / steps] for op, (n, ns) in ranked],
    'ops': {op: [part_of(op), n / steps, ns * 1e-9 / steps] for op, (n, ns) in ops.items()},
    'kernel_stats': sorted(stat_names),  # What the profiler recorded per kernel.
  }


def trace_file(logdir: str, since: float = 0.0) -> str:
  """The newest `.xplane.pb` that `jax.profiler.trace(logdir)` wrote at or after `since`
  (a `time.time()`; an older trace in a reused directory is not taken for this one)."""
  found = glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  found = [f for f in found if os.path.getmtime(f) >= since]
  if not found:
    raise FileNotFoundError(f'no new .xplane.pb under {logdir}/plugins/profile: did the trace run?')
  return max(found, key=os.path.getmtime)


def trace_steps(run_step: Callable[[], Any], logdir: str, steps: int, hlo_text: str) -> dict:
  """Traces `steps` calls of `run_step` (each must block until its work is done) into `logdir`
  and summarises them (`summarize`, with the trace's path under 'trace'); on any failure
  {'error': why}, so that a caller's timings still stand."""
  try:
    began = time.time()
    # Device kernels only: no Python calls, no host events, no HLO protos (they made a trace
    # of 2 tiny CPU steps 20 MB).
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level, options.host_tracer_level = 0, 1
    options.enable_hlo_proto, options.raise_error_on_start_failure = False, True
    with jax.profiler.trace(logdir, profiler_options=options):
      for _ in range(steps):
        run_step()
    path = trace_file(logdir, since=began - 1)
    data = jax.profiler.ProfileData.from_file(path)
    instructions = list(_instructions(hlo_text))  # Parsed once for parts and name stacks.
    summary = summarize(data, _categories(instructions), steps)
    names = {name: op_name for name, _, _, op_name in instructions if op_name is not None}
    scopes = {op: short_scope(names.get(op, '')) for op, *_ in summary['top_ops']}
    return {**summary, 'top_op_scopes': scopes, 'trace': path}
  except Exception as e:
    return {'error': f'{type(e).__name__}: {e}'}
