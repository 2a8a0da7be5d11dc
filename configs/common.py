"""The shared config schema: every field any experiment can set, with its default.

Experiment files (`vitb.py`, `demo.py`, ...) call `get_base_config()` and change numbers.
`python -m triplane3d.main --config=configs/X.py --config.a.b=v` overrides a field; an
unknown field is an error (ConfigDicts here are locked).

Defaults are the paper's ViT-B/14 settings (docs/method.md) unless a comment says otherwise.
"""

import ml_collections as mlc


def get_base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  c.workdir = ''  # Also settable by --workdir.

  # The student backbone (and, with distillation, its frozen teacher).
  c.model = mlc.ConfigDict()
  c.model.variant = 'vitb14'  # vits14 / vitb14 / vitl14 / vitg14, optionally '_reg'.
  # DINOv2 weights: a .pth / .safetensors file, a Hugging Face directory or hub name
  # (e.g. 'facebook/dinov2-base'). Empty: random initialisation (the "from scratch" ablation).
  c.model.init_from = ''
  c.model.img_size = 224
  c.model.dtype = 'bfloat16'  # Computation dtype; parameters stay float32.
  c.model.remat = True  # Rematerialise each block in the backward pass.
  # What a rematerialised block keeps: 'full' (nothing, recompute it all) or 'dots' (keep the
  # matmul outputs, recompute the rest: fewer FLOPs, but +41 MiB per image for ViT-B, so v5e no
  # longer holds 128/chip; docs/performance.md, "Optimisations").
  c.model.remat_policy = 'full'
  # One `lax.scan` over the ViT blocks (same parameters, same values): XLA compiles one block
  # instead of all of them — ViT-L with FSDP compiles in 43 % less time, 0.6 GiB less code — but
  # stacking costs temporaries (ViT-B at 128/chip on v5e: +3.2 GiB, no longer fits). Off
  # (docs/performance.md, Optimisations). Needs model.drop_path_rate=0 in training.
  c.model.scan_blocks = False
  c.model.drop_path_rate = 0.0
  c.model.num_layers_h = 4  # h = normed cls + patch tokens of the last N blocks.

  # The decoder from h to triplanes (or, for the ablation, straight to RGB + depth).
  c.decoder = mlc.ConfigDict()
  c.decoder.kind = 'triplane'  # 'triplane' | 'conv' (the "no triplane" ablation).
  c.decoder.width = 512  # D_dec: width of the learnable plane embeddings.
  c.decoder.num_heads = 8
  c.decoder.num_layers = 1  # Cross-attention blocks (queries: embeddings; keys: h).
  c.decoder.low_res = 16  # Resolution of the learnable embeddings / low-res triplanes.
  c.decoder.up_channels = (256, 128, 64)  # One ×2 upsampling block each: 16 → 128.
  # The blocks: 'bilinear' (the paper: bilinear ×2 → 3×3 conv) or 'shuffle' (3×3 conv to 4×
  # the channels at the lower resolution → depth-to-space; same FLOPs; models/layers.py).
  c.decoder.upsample = 'bilinear'
  c.decoder.plane_channels = 32  # C: triplane feature channels (EG3D).
  # Rematerialise the triplane decoder's upsampling (recompute it in the backward pass; kind
  # 'conv' ignores it): the same numbers, 0.8 GiB less at ViT-B 128/chip on v5e for +2 % FLOPs;
  # off, as it does not raise the largest batch (docs/performance.md, "Optimisations").
  c.decoder.remat = False
  # Computation dtype of the decoder (the point MLP's is render.mlp_dtype; rendering is float32).
  c.decoder.dtype = 'bfloat16'
  # 'camera': the cross-attention starts local, each plane cell attending to the patches it
  # projects to under the fixed camera (models/attention_prior.py). 'none': the paper.
  c.decoder.attention_prior = 'none'
  c.decoder.attention_prior_sigma = 1.0  # The prior's Gaussian width, in patches.
  # Heads carrying the prior (the first ones); None: all. The rest start global.
  c.decoder.attention_prior_heads = mlc.config_dict.placeholder(int)

  # Volume rendering (docs/method.md, "The renderer").
  c.render = mlc.ConfigDict()
  c.render.resolution = 256
  c.render.num_coarse = 16
  c.render.num_fine = 16
  c.render.plane_axes = 'xyz'  # 'xyz' (xy, xz, yz) or 'eg3d' (xy, xz, zx: EG3D's bug).
  # 'box': the planes span the world box (EG3D, the paper). 'frustum': they span the camera's
  # image coordinates and ray distance, (u, v), (u, t), (v, t) (Camera.frustum_to_box).
  c.render.plane_space = 'box'
  c.render.white_background = False
  c.render.mlp_hidden = 64
  # Computation dtype of the point MLP's two matmuls and its hidden activations (outputs and
  # marching stay float32; 'float32' is EG3D's decoder). bfloat16 halves the bytes of the
  # per-sample activations: the ViT-B/14 step on an H100 0.592 → 0.488 s, 15.7 → 13.4 GB; v5e
  # 128/chip unchanged (14.03 GiB of temporaries). The demo at 3 seeds and 6 one-scene fits
  # reconstruct as well as in float32 (docs/performance.md, "The point MLP in bfloat16").
  c.render.mlp_dtype = 'bfloat16'
  # Rays per rematerialised chunk, per device whatever its batch (render.render_batch): 146 MiB
  # of temporaries for fwd+bwd of a 256² image at 16 + 16 samples and C = 32 (8192: 272 MiB);
  # 0 renders all rays of all images at once (2 GiB per image).
  c.render.chunk = 4096
  # The chunk on GPUs: 4 whole 256² images per rematerialised step. A GPU launches every loop
  # trip's kernels from the host (~5 µs each): at 4096 the ViT-B/14 step at 64 per GPU launched
  # ~368 000 kernels (1.56 s on an H100), at 262144 ~4 600 (0.59 s, 15.7 GB of its 80;
  # docs/performance.md, "The step on a GPU"). 0: render.chunk on GPUs too.
  c.render.gpu_chunk = 262144
  c.render.rays_per_image = 0  # > 0: train on a random subset of rays per image.
  c.render.pdf_search = 'mask'  # 'mask' (TPU-friendly) or 'searchsorted'.
  # How the plane lookup sums its 12 bilinear taps: 'auto' (fused on GPUs; on CPU fused
  # forward, a loop over taps backward; a loop on TPU), 'fused' or 'loop' (render/planes.py).
  c.render.taps = 'auto'
  # 'xla', or 'pallas': the lookup and the point MLP as one Triton kernel on GPUs (interpreted,
  # slowly, elsewhere; render/fused.py). On an H100 4.6× slower than 'xla' (docs/performance.md).
  # The kernel computes in float32: with it, set render.mlp_dtype='float32'.
  c.render.lookup = 'xla'
  # How coarse and fine samples are merged by depth: 'rank' (comparisons and selects, no sort
  # kernel), 'sort' (jax.lax.sort), or 'auto': the sort on GPUs, where XLA compiles 'rank'
  # very slowly (the ViT-B/14 step for an H100: 336 s against 93 s), 'rank' elsewhere (the
  # CPU demo step ~5 % faster). The same numbers (render/renderer.py, `_co_sort`).
  c.render.sort = 'auto'

  # The one camera (see triplane3d/render/camera.py for the conventions).
  c.camera = mlc.ConfigDict()
  c.camera.fx = 1.5
  c.camera.fy = 1.5
  c.camera.cx = 0.5
  c.camera.cy = 0.5
  # Scene depths (targets, synthetic scenes) lie in [near, far]; rays are sampled over
  # [near - margin, far + margin] so that depth at `far` is reachable (render/camera.py).
  c.camera.near = 1.5
  c.camera.far = 2.5
  c.camera.margin = 0.1
  c.camera.position = (0.0, 0.0, 0.0)
  c.camera.rotation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
  c.camera.box_center = (0.0, 0.0, 2.0)
  # The frustum must stay inside the box (checked at start-up): see render/camera.py.
  c.camera.box_size = 2.0

  # How pseudo depth is mapped into [camera.near, camera.far].
  c.depth = mlc.ConfigDict()
  # 'percentile': per-image affine map of the lo/hi percentiles to near/far (clipped).
  # 'minmax': the same with min and max. 'none': depth is already metric in the scene range.
  c.depth.normalize = 'percentile'
  c.depth.lo_percentile = 2.0
  c.depth.hi_percentile = 98.0
  # Whether the stored depth is disparity (larger = nearer; DPT, relative Depth Anything) rather
  # than distance (ZoeDepth). None: what the depth dataset records (precompute_depth stores it);
  # True / False overrides that.
  c.depth.is_disparity = mlc.config_dict.placeholder(bool)

  # Objective: L = 0.1 L_rgb + 1 L_depth + 1 L_dist + 1e-3 L_norm.
  c.loss = mlc.ConfigDict()
  c.loss.rgb_weight = 0.1
  c.loss.depth_weight = 1.0
  c.loss.depth_loss = 'l2'  # 'l2': the paper's MSE. 'l1': mean absolute error (losses.py).
  c.loss.dist_weight = 1.0  # 0 disables distillation (and the teacher).
  c.loss.norm_weight = 1e-3
  # The paper writes L_norm as a sum over points; a mean keeps its scale independent of the
  # number of rays and samples. 'mean' (default) or 'sum' (per image, averaged over images).
  c.loss.norm_reduction = 'mean'

  # Data.
  c.data = mlc.ConfigDict()
  c.data.source = 'tfds'  # 'tfds' (ArrayRecord, through tfds.data_source) or 'synthetic'.
  c.data.name = 'imagenet2012'
  c.data.split = 'train'
  c.data.data_dir = ''  # Empty: TFDS default.
  # The precomputed pseudo-depth dataset; empty: '<data.name>_depth' (precompute_depth's default).
  c.data.depth_name = ''
  c.data.num_synthetic = 0  # Synthetic source only: number of scenes to generate.
  # Synthetic source only: the probability that a scene's object has its class's own texture
  # (else a texture drawn independently of the class). 1: texture always predicts the shape.
  c.data.synthetic_texture_prob = 1.0
  # Synthetic source only: store a degraded depth, as a cheap depth estimator would give it
  # (data/synthetic.py `degrade_depth`): Gaussian blur (σ in pixels of the renderer's targets,
  # render.resolution) and noise (std in scene units, one value per target pixel). 0, 0: exact
  # depth. Held-out scenes are scored on exact depth.
  c.data.synthetic_depth_blur = 0.0
  c.data.synthetic_depth_noise = 0.0
  c.data.subset_size = 0  # > 0: train on a fixed random subset of N examples (ablation).
  c.data.crop_scale = (0.08, 1.0)  # Random resized crop (scale, ratio).
  c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.flip = True
  c.data.num_workers = 8  # grain worker processes per host; 0 reads in the main process.
  c.data.prefetch = 2
  # Batches kept assembled and already on the devices (sharded) ahead of the step, drawn by a
  # background thread, so the host's batch assembly and the host→device copy overlap the step
  # in flight (data/prefetch.py). Checkpoints keep the consumed position. 0: off, synchronous.
  # 1, not more: each batch held costs device memory the fit check does not count (ViT-B at
  # 128/chip on v5e: 78 MB per batch of uint8 pixels, with 0.13 GiB to spare; docs/performance.md).
  c.data.device_prefetch = 1
  c.data.max_bad_fraction = 0.001  # Stop if more than this fraction of images is corrupt.

  # Reconstruction quality on held-out scenes (synthetic source only): scenes
  # [num_synthetic, num_synthetic + num_heldout) of the same generator, never trained on,
  # rendered whole and compared with the trivial baselines (evaluate/reconstruction.py) at
  # every image step and at the end. 0 disables.
  c.eval = mlc.ConfigDict()
  c.eval.num_heldout = 0

  # Optimisation.
  c.optim = mlc.ConfigDict()
  c.optim.name = 'adam'  # 'adam' | 'adamw'
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.schedule = 'constant'  # 'constant' | 'cosine'
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = 0.0  # 0: no clipping.
  # Per-group learning-rate multipliers by parameter-path regex; first match wins, every
  # parameter must match a rule. A multiplier of 0 freezes the group.
  c.optim.lr_mults = (('.*', 1.0),)

  # Time.
  c.train = mlc.ConfigDict()
  c.train.batch_size = 512  # Global batch.
  c.train.accum_steps = 1  # Split each global batch into k micro-batches, one update (memory).
  c.train.num_epochs = 10
  c.train.num_steps = 0  # > 0 overrides num_epochs.
  c.train.log_every_steps = 50
  # Reconstruction grids (workdir/images) at step 0, every this many steps and at the end; 0:
  # none. Held-out scenes (eval.num_heldout) are scored at these steps, and at the end.
  c.train.image_every_steps = 1000
  c.train.ckpt_every_steps = 1000
  c.train.keep_ckpts = 3
  # Multi-host: how often hosts agree on a preemption signal (a small blocking collective).
  c.train.preempt_sync_every_steps = 10

  # Parallelism: a (data, fsdp) mesh. -1 takes whatever devices remain.
  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c
