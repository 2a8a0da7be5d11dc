"""`device_time`: a profile's kernels summed per step and attributed to model parts through the
compiled program's name stacks."""

import jax
import jax.numpy as jnp
import pytest

from triplane3d import device_time

# Two steps on one GPU: two streams whose kernels overlap for 1 µs, a derived 'XLA Ops' line
# that repeats a kernel (ignored), and a host plane (ignored). Times in ps from the line start.
GPU_PLANE = """
planes {
  name: "/device:GPU:0"
  lines { name: "Stream #13(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 stats { metadata_id: 9 str_value: "fusion.1" } }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 2000000 stats { metadata_id: 9 str_value: "dot.2" } }
    events { metadata_id: 1 offset_ps: 10000000 duration_ps: 4000000 stats { metadata_id: 9 str_value: "fusion.1" } }
  }
  lines { name: "Stream #14(Compute)" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 3000000 duration_ps: 1000000 stats { metadata_id: 9 str_value: "custom.3" } }
    events { metadata_id: 3 offset_ps: 15000000 duration_ps: 1000000 }
  }
  lines { name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_fusion_1" } }
  event_metadata { key: 2 value { id: 2 name: "sm90_gemm" } }
  event_metadata { key: 3 value { id: 3 name: "memset_kernel" } }
  stat_metadata { key: 9 value { id: 9 name: "hlo_op" } }
}
"""
HOST_PLANE = """
planes {
  name: "/host:CPU"
  lines { name: "python" timestamp_ns: 0 events { metadata_id: 1 offset_ps: 0 duration_ps: 99000000 } }
  event_metadata { key: 1 value { id: 1 name: "train_step" } }
}
"""


def test_summary_per_step_by_part_and_op():
  data = jax.profiler.ProfileData.from_text_proto(GPU_PLANE + HOST_PLANE)
  parts = {'fusion.1': 'renderer', 'dot.2': 'backbone bwd'}
  s = device_time.summarize(data, parts, steps=2)
  assert s['kernels_per_step'] == 2.5
  # Busy: [0, 4] ∪ [3, 4] ∪ [5, 7] ∪ [10, 14] ∪ [15, 16] µs = 4 + 2 + 4 + 1 = 11 µs; span 16 µs.
  assert s['device_busy_s_per_step'] == pytest.approx(5.5e-6)
  assert s['device_span_s_per_step'] == pytest.approx(8e-6)
  assert s['device_busy_share'] == pytest.approx(11 / 16)
  assert s['by_part_s_per_step'] == pytest.approx(
    {'renderer': 4e-6, 'backbone bwd': 1e-6, 'unattributed': 1e-6}
  )
  # Without an hlo_op stat a kernel is named by itself.
  assert s['top_ops'][0] == ['fusion.1', 'renderer', 1.0, pytest.approx(4e-6)]
  assert [o[0] for o in s['top_ops']] == ['fusion.1', 'dot.2', 'custom.3', 'memset_kernel']
  assert s['ops']['dot.2'] == ['backbone bwd', 0.5, pytest.approx(1e-6)]


def test_no_device_plane_and_no_cpu_ops_give_an_empty_summary():
  data = jax.profiler.ProfileData.from_text_proto(HOST_PLANE)
  s = device_time.summarize(data, {}, steps=1)
  assert s['kernels_per_step'] == 0 and s['device_busy_share'] is None and s['top_ops'] == []
  assert s['source'] is None


# XLA:CPU's thunks on two host threads (times in µs from 0): thread A runs a while loop
# [0, 10] whose body ops are fusion.1 [1, 4], dot.2 [5, 9] and bitcast.5 [5, 5] (no time: it
# encloses nothing); thread B runs copy.3 [3, 7] and bitcast.4 [8, 8]; a python-thread event
# and an event without hlo_op are not ops.
def _cpu_event(op, start_us, dur_us):
  stat = f'stats {{ metadata_id: 9 str_value: "{op}" }}' if op else ''
  return (
    f'events {{ metadata_id: 1 offset_ps: {start_us}000000 duration_ps: {dur_us}000000 {stat} }}'
  )


CPU_PLANE = f"""
planes {{
  name: "/host:CPU"
  lines {{ name: "python" timestamp_ns: 0 {_cpu_event('', 0, 20)} }}
  lines {{ name: "tf_XLAEigen/1" timestamp_ns: 0
    {_cpu_event('while.9', 0, 10)} {_cpu_event('fusion.1', 1, 3)} {_cpu_event('dot.2', 5, 4)}
    {_cpu_event('bitcast.5', 5, 0)}
    {_cpu_event('', 11, 2)}
  }}
  lines {{ name: "tf_XLAEigen/2" timestamp_ns: 0
    {_cpu_event('copy.3', 3, 4)} {_cpu_event('bitcast.4', 8, 0)}
  }}
  event_metadata {{ key: 1 value {{ id: 1 name: "thunk" }} }}
  stat_metadata {{ key: 9 value {{ id: 9 name: "hlo_op" }} }}
}}
"""


def test_cpu_thunks_innermost_only_and_shared_time_split():
  data = jax.profiler.ProfileData.from_text_proto(CPU_PLANE)
  parts = {'while.9': 'renderer', 'fusion.1': 'decoder', 'dot.2': 'decoder bwd', 'copy.3': 'loss'}
  parts['bitcast.4'] = parts['bitcast.5'] = 'loss'
  s = device_time.summarize(data, parts, steps=1)
  assert s['source'] == 'host threads' and s['kernels_per_step'] == 5  # Not the while loop.
  # fusion.1 alone [1, 3], with copy.3 [3, 4]; copy.3 alone [4, 5], with dot.2 [5, 7]; dot.2
  # alone [7, 9]: fusion 2 + 0.5, copy 0.5 + 1 + 1, dot 1 + 2 µs; busy [1, 9] = 8 µs.
  assert s['by_part_s_per_step'] == pytest.approx(
    {'decoder': 2.5e-6, 'loss': 2.5e-6, 'decoder bwd': 3e-6}
  )
  assert s['device_busy_s_per_step'] == pytest.approx(8e-6)
  assert s['device_span_s_per_step'] == pytest.approx(8e-6)
  assert s['top_ops'][0] == ['dot.2', 'decoder bwd', 1.0, pytest.approx(3e-6)]
  assert s['ops']['bitcast.4'] == ['loss', 1.0, 0.0]


def test_a_real_cpu_trace_names_the_parts(tmp_path):
  """The compiler option makes XLA:CPU record its ops, and they are found in the trace."""

  def f(x):
    with jax.named_scope('render'):
      y = jnp.sort(x @ x, axis=1)  # A sort fuses with neither the matmul nor the sum.
    with jax.named_scope('loss'):
      return jnp.sum(y * y)

  x = jax.random.normal(jax.random.key(0), (256, 256))
  compiled = jax.jit(f).lower(x).compile(device_time.CPU_TRACE_OPTIONS)
  compiled(x).block_until_ready()
  s = device_time.trace_steps(
    lambda: compiled(x).block_until_ready(), str(tmp_path), 2, compiled.as_text()
  )
  assert s['source'] == 'host threads', s
  assert {'renderer', 'loss'} <= set(s['by_part_s_per_step'])
  assert s['kernels_per_step'] >= 2 and 'unattributed' not in s['by_part_s_per_step']
  # Each listed op with its name stack, wrappers dropped: the sort is 'render/sort'.
  assert set(s['top_op_scopes']) == {op for op, *_ in s['top_ops']}
  assert 'render/sort' in s['top_op_scopes'].values()


@pytest.mark.parametrize(
  ('op_name', 'scope'),
  [
    (
      'jit(train_step)/transpose(jvp(TriplaneDecoder))/up1/conv/cond/branch_0_fun/'
      'transpose(jvp())/conv_general_dilated',
      'TriplaneDecoder/up1/conv/conv_general_dilated',
    ),
    (
      'jit(train_step)/transpose(jvp(render))/cond/branch_0_fun/while/body/closed_call/'
      'checkpoint/rematted_computation/cond/branch_0_fun/add',
      'render/add',
    ),
    (
      'jit(train_step)/teacher/DinoViT.get_intermediate_layers/norm',
      'teacher/DinoViT.get_intermediate_layers/norm',
    ),
    ('jit(f)/jvp(render)/vmap(vmap(jit(_uniform)))/vmap(vmap())/add', 'render/add'),
    ('', ''),
  ],
)
def test_short_scope_drops_the_wrappers(op_name, scope):
  assert device_time.short_scope(op_name) == scope


def test_ops_without_a_name_stack_take_their_users_part():
  text = """
  %p = f32[4]{0} parameter(0), metadata={op_name="x"}
  %copy.1 = f32[4]{0} copy(%p)
  %fusion.2 = f32[4]{0} fusion(%copy.1), kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(f)/transpose(jvp(TriplaneDecoder))/up0/conv"}
  %transpose.4 = f32[4]{0} transpose(%fusion.2), dimensions={0}
  %all-reduce.5 = (f32[4]{0}, f32[]) all-reduce(%fusion.2, %c.6), to_apply=%add, metadata={op_name="(jit(f)/render/mul:jit(f)/loss/add)"}
  %c.6 = f32[] constant(1), metadata={op_name="jit(f)/loss/add"}
  %cond.7 = f32[4]{0} conditional(%c.6, %copy.1, %copy.1), branch_computations={%region_2.4, %region_3.7}
  %loose.8 = f32[4]{0} constant({1, 2, 3, 4})
  ROOT %tuple.9 = (f32[4]{0}) tuple(%transpose.4)
  """
  parts = device_time.op_categories(text)
  # The copy made for the decoder's backward is its, and so is the parameter it copies (a
  # parameter's op_name is its argument's name); the transpose after it, which feeds only the
  # unnamed output tuple, takes its operand's; XLA's merged all-reduce is a collective, whatever
  # its op_name lists; the constant feeds the loss.
  assert parts['copy.1'] == parts['fusion.2'] == parts['transpose.4'] == 'decoder bwd'
  assert parts['p'] == 'decoder bwd' and parts['all-reduce.5'] == 'collectives'
  # `cond.7` reads the named `c.6` and `copy.1`, which has a part only by propagation.
  assert parts['c.6'] == 'loss' and parts['cond.7'] == 'loss'
  assert 'loose.8' not in parts and parts['tuple.9'] == 'decoder bwd'
  # `calls=%...` and `branch_computations={%...}` name computations, not operands.
  assert not {'fused_computation.3', 'region_2.4', 'region_3.7', 'add'} & set(parts)


def test_op_categories_follow_the_name_scopes_forward_and_backward():
  def loss(w, x):
    with jax.named_scope('render'):
      y = jax.checkpoint(lambda w, x: jnp.sin(jnp.sin(x @ w) @ w))(w, x)
    with jax.named_scope('loss'):
      return jnp.sum(y * y)

  text = jax.jit(jax.grad(loss)).lower(jnp.ones((8, 8)), jnp.ones((4, 8))).compile().as_text()
  parts = device_time.op_categories(text)
  assert {'renderer', 'renderer bwd', 'renderer recompute'} <= set(parts.values())
  assert all(p.split()[0] in {'renderer', 'loss', 'other'} for p in parts.values())


@pytest.mark.parametrize(
  ('op_name', 'part'),
  [
    ('jit(train_step)/jvp(DinoViT.get_intermediate_layers)/blocks_0/attn', 'backbone'),
    ('jit(train_step)/transpose(jvp(TriplaneDecoder))/up0/conv', 'decoder bwd'),
    ('jit(train_step)/transpose(jvp(render))/TriplaneDecoder/vmap()/mul', 'renderer bwd'),
    ('jit(train_step)/teacher/DinoViT.get_intermediate_layers/norm', 'teacher'),
    ('jit(train_step)/optimizer/mul', 'optimizer'),
    ('jit(train_step)/rendering/add', 'other'),
    (
      'jit(f)/transpose(jvp(render))/jvp(render)/checkpoint/rematted_computation/dot',
      'renderer recompute',
    ),
  ],
)
def test_category(op_name, part):
  assert device_time.category(op_name) == part


def test_kernel_without_hlo_op_is_matched_by_its_fusion_name():
  proto = GPU_PLANE.replace('name: "memset_kernel"', 'name: "loop_add_fusion_7"')
  data = jax.profiler.ProfileData.from_text_proto(proto)
  s = device_time.summarize(data, {'loop_add_fusion.7': 'optimizer'}, steps=1)
  assert s['by_part_s_per_step']['optimizer'] == pytest.approx(1e-6)  # The one without hlo_op.
  assert s['kernel_stats'] == ['hlo_op']


def test_kernels_of_a_command_buffer_are_named_by_their_fusion():
  proto = GPU_PLANE.replace('str_value: "dot.2"', 'str_value: "command_buffer_5"')
  proto = proto.replace('name: "sm90_gemm"', 'name: "gemm_fusion_dot_2"')
  data = jax.profiler.ProfileData.from_text_proto(proto)
  s = device_time.summarize(data, {'fusion.1': 'renderer', 'gemm_fusion_dot.2': 'loss'}, steps=1)
  assert s['by_part_s_per_step']['loss'] == pytest.approx(2e-6)
  assert ['gemm_fusion_dot_2', 'loss', 1.0, pytest.approx(2e-6)] in s['top_ops']


def test_a_tpu_plane_is_read_from_its_xla_ops_line():
  # A TPU device plane: ops on 'XLA Ops', their module on 'XLA Modules' (not counted twice).
  proto = """
  planes {
    name: "/device:TPU:0"
    lines { name: "XLA Modules" timestamp_ns: 0
      events { metadata_id: 2 offset_ps: 0 duration_ps: 9000000 } }
    lines { name: "XLA Ops" timestamp_ns: 0
      events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000 }
      events { metadata_id: 1 offset_ps: 4000000 duration_ps: 3000000 } }
    event_metadata { key: 1 value { id: 1 name: "fusion.1" } }
    event_metadata { key: 2 value { id: 2 name: "jit_train_step" } }
  }
  """
  data = jax.profiler.ProfileData.from_text_proto(proto)
  s = device_time.summarize(data, {'fusion.1': 'decoder'}, steps=1)
  assert s['kernels_per_step'] == 2 and s['by_part_s_per_step'] == {'decoder': pytest.approx(6e-6)}
  assert s['device_busy_share'] == pytest.approx(6 / 7)


def test_a_failed_trace_is_reported_not_raised(tmp_path):
  def failing_step():
    raise RuntimeError('device lost')

  out = device_time.trace_steps(failing_step, str(tmp_path), 2, '')
  assert out == {'error': 'RuntimeError: device lost'}
