"""The evaluation config schema: every field any eval config can set, with its default.

Suite files (`synthetic.py`, `imagenet.py`, ...) call `get_base_config()` and change numbers;
`--config.a.b=v` overrides a field and an unknown field is an error. Defaults follow DINOv2's
evaluation protocols (docs/evaluation.md) unless a comment says otherwise.
"""

import ml_collections as mlc


def get_base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  # Comma-separated: synthetic, imagenet, shape_bias, inat21, nyu_depth, or all.
  c.suites = 'synthetic'
  # Comma-separated backbone specs, each optionally LABEL=SPEC: random:<variant>, a DINOv2
  # .pth / .safetensors file, a Hugging Face directory, hf:<org>/<name>, a training workdir
  # (DIR or DIR@STEP). See triplane3d/evaluate/backbones.py.
  c.backbones = ''
  # The training config of workdirs that store none (runs older than config.json), e.g.
  # configs/demo.py; without either, the architecture is inferred from the weights' shapes.
  c.train_config = ''
  c.data_dir = ''  # TFDS data dir of the real datasets; empty: ~/tensorflow_datasets.
  c.img_size = 224  # Backbone input side (a multiple of 14); positional embeddings resized.
  c.batch_size = 64  # Images per feature-extraction batch.
  c.dtype = 'float32'  # Backbone computation dtype during extraction.
  c.seed = 0  # Initialisation of random:<variant> backbones.

  # DINOv2's linear probe (evaluate/linear.py): {last 1, last 4 class tokens} x {with, without
  # avgpool} x learning rates (each x batch/256), SGD momentum 0.9, cosine to 0.
  c.probe = mlc.ConfigDict()
  c.probe.epochs = 10
  c.probe.batch_size = 1024  # Capped at the training set's size.
  c.probe.lrs = ()  # Empty: DINOv2's 13 learning rates (linear.LEARNING_RATES).
  c.probe.seed = 0
  # DINOv2 trains the heads on random-resized-crop + flip views, new ones each epoch
  # (evaluate/probe.py). False: "fast mode", features of the evaluation view every epoch (one
  # extraction pass; labelled "(fast: ...)" in results.md and results.json).
  c.probe.augment = False
  c.probe.augment_epochs = 0  # View sets extracted (epoch e uses e mod K); 0: one per epoch.

  # Synthetic scenes (evaluate/synthetic_suite.py). Seeds seed .. seed + 8, one per set, far
  # from the demo's training seed 0.
  c.synthetic = mlc.ConfigDict()
  c.synthetic.seed = 1000
  c.synthetic.num_train = 2000
  c.synthetic.num_val = 500  # Also the depth probe's alpha-selection set size.
  c.synthetic.num_test = 500  # Also the depth test set size.
  c.synthetic.num_shift = 500  # Each of the texture, size and cue-conflict sets.
  c.synthetic.num_depth_train = 500
  # Probability that a training (and test) scene has its class's own texture; otherwise the
  # texture is drawn independently of the class. 0: texture carries no class information.
  c.synthetic.texture_class_prob = 0.8
  c.synthetic.train_size = 'medium'  # small | medium | large; the other two are the size shift.
  c.synthetic.depth_sub = 7  # Depth values per patch side (1, 2, 7 or 14): 2x2-pixel cells.
  # The linear probe's length for these small sets (its lrs and seed come from `probe`):
  # 2000 images at batch 256 for 100 epochs is 700 iterations.
  c.synthetic.probe_epochs = 100
  c.synthetic.probe_batch_size = 256

  # Classification suites: DINOv2 linear probe; `robustness` sets ('dataset:split') are scored
  # with the same head, each restricted to the classes it contains (ImageNet-R: 200).
  c.imagenet = mlc.ConfigDict()
  c.imagenet.dataset = 'imagenet2012'
  c.imagenet.train_split = 'train'
  c.imagenet.val_split = 'validation'
  c.imagenet.num_classes = 1000
  c.imagenet.max_train = 0  # > 0: a fixed random subset (quick looks; not the protocol).
  c.imagenet.max_val = 0
  c.imagenet.robustness = ('imagenet_r:test', 'imagenet_sketch:test')

  # Robustness sets scored with the ImageNet head (evaluate/robustness.py), folder datasets
  # imported with triplane3d.data.import_folder. Off here (empty); configs/eval/imagenet.py
  # turns them on.
  c.pug_imagenet = mlc.ConfigDict()
  c.pug_imagenet.dataset = 'pug_imagenet'
  c.pug_imagenet.splits = ()  # Imported factors: 'texture' (Object_Texture), 'size' (Object_Scale).
  c.pug_imagenet.mapping = ''  # Class -> ImageNet indices JSON; '' = PUG's, in package data.
  # True: argmax over the mapped ImageNet logits only (our protocol); False: over all 1000, as PUG's
  # notebook does.
  c.pug_imagenet.restrict = True
  c.imagenet_3dcc = mlc.ConfigDict()
  c.imagenet_3dcc.dataset = 'imagenet_3dcc'
  c.imagenet_3dcc.corruptions = ()  # Of robustness.CORRUPTIONS_3DCC; splits '<corruption>_<s>'.
  c.imagenet_3dcc.severities = (1, 2, 3, 4, 5)
  c.imagenet_3dcc.max_per_split = 0  # > 0: a fixed random subset per level (quick looks).
  c.imagenet_3dcc.preprocess = 'dinov2'  # 'resize' if your copy is stored pre-cropped.

  c.inat21 = mlc.ConfigDict()
  c.inat21.dataset = 'i_naturalist2021'
  c.inat21.train_split = 'train'
  c.inat21.val_split = 'val'
  c.inat21.num_classes = 10000
  c.inat21.max_train = 0
  c.inat21.max_val = 0
  c.inat21.robustness = ()

  # Geirhos cue-conflict stimuli imported as a dataset (file names say shape and texture).
  c.shape_bias = mlc.ConfigDict()
  c.shape_bias.dataset = 'cue_conflict'
  c.shape_bias.split = 'train'

  # NYU-Depth v2 (evaluate/nyu_suite.py): DINOv2's linear depth protocol (depth_linear.py) or
  # the closed-form ridge probe (depth_probe.py), on frozen features of centre crops.
  c.nyu_depth = mlc.ConfigDict()
  c.nyu_depth.probe = 'linear'  # 'linear' (DINOv2) | 'ridge' (fast, not the protocol)
  c.nyu_depth.dataset = 'nyu_depth_v2'  # TFDS name, read when `folder` is empty.
  c.nyu_depth.train_split = 'train'
  c.nyu_depth.test_split = 'validation'  # TFDS: the 654 labelled test frames.
  c.nyu_depth.folder = ''  # Or DINOv2's toolbox layout: DIR/{train_list,test_list} + frames.
  c.nyu_depth.train_list = 'nyu_train.txt'
  c.nyu_depth.test_list = 'nyu_test.txt'
  c.nyu_depth.num_train = 1000  # A fixed random subset (features: ~1.5 MB per ViT-B image).
  c.nyu_depth.num_val = 200  # ridge only: further train images, for choosing alpha.
  c.nyu_depth.num_test = 0  # 0: every test image.
  c.nyu_depth.depth_sub = 14  # Depth values per patch side: 14 = full resolution (S x S).
  c.nyu_depth.eigen_crop = True  # Ground truth outside Eigen's crop of 480x640 frames ignored.
  c.nyu_depth.test_flip = True  # linear: average with the mirrored image's prediction.
  # linear: DINOv2's NYU linear config (depth_linear.Settings).
  c.nyu_depth.steps = 38400
  c.nyu_depth.warmup_steps = 12800  # Linear lr warm-up from 0.001 x lr.
  c.nyu_depth.batch_size = 16  # DINOv2: 2 per GPU, GPU count not in its config.
  c.nyu_depth.lr = 1e-4
  c.nyu_depth.weight_decay = 0.01
  c.nyu_depth.grad_clip = 35.0
  # DINOv2's config says 0.5, but its code makes the term 0 at 2 images per GPU
  # (depth_losses.py): 0.0 reproduces the objective DINOv2 actually trained with.
  c.nyu_depth.grad_loss_weight = 0.5
  c.nyu_depth.sigloss_warmup_steps = 100
  c.nyu_depth.n_bins = 256
  c.nyu_depth.min_depth = 1e-3
  c.nyu_depth.max_depth = 10.0
  c.nyu_depth.upsample = 4
  c.nyu_depth.seed = 0
  return c
