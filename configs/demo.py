"""The demo: Muse trained and sampled end to end on the synthetic shapes set, on a CPU.

  muse-jax demo --workdir /tmp/muse_demo                      # 7-9 minutes on 2 cores: ~84%
  muse-jax demo --workdir /tmp/demo_tiny --config=configs/demo.py:tiny   # a minute: the test's
  muse-jax demo --workdir /tmp/demo_long --config=configs/demo.py:long  # ~18 minutes: ~85%

Every knob is overridable as `--config.a.b=value`. Stages that finished are reused on a
second run (their `.done` markers in the workdir), so it then only generates.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 64  # canvas side: the shapes set's default, where its judge is exact
  # (colour, shape) pairs never seen in training: compositional generalisation is
  # measured on them.
  c.held_out = ("purple circle", "orange square", "green triangle")
  c.forms = dict(single=0.6, count=0.2, relation=0.2)
  # How often each shape is drawn, in every stage's data (shapes.sample_scene). Squares are
  # the shape the base learns last. Drawn 3 times as often, 195 of 400 square images come
  # out right instead of 164, while circles and triangles keep 392 and 398 of 400 (397 and
  # 397 at weight 1). Seen single-object images right of 1200 (benchmarks/demo_judge.py,
  # seeds 0-4 and 100-104; each base trained on one tokenizer's tokens, 2026-12-07): square
  # weight 1 958, 2 978, 3 985, 5 983 (squares 220, circles 372). A whole demo with 3, its
  # tokenizer trained on the weighted images too: 515 and 499 (squares 134 and 122 of 200).
  c.shape_weights = dict(circle=1.0, square=3.0, triangle=1.0)
  # Data-reading threads of the tokenizer's images, the pre-encoding and the base's token
  # records (grain's 16 by default). The examples are small and made or read in Python, so
  # threads only contend for the two cores that the training steps use: a batch of 64 token
  # records costs 8 ms of CPU read in the training loop against 22 with 16 threads (17-18
  # with one), and 8 shapes images 3.9 against 7.4. The base fits 516-526 steps in 90 s
  # this way against 483-497 (2026-11-27).
  c.read_threads = 0

  # A frozen text encoder: a random T5 v1.1-style encoder with a word-level vocabulary
  # of the captions' words (nothing to download; what matters to Muse is that it is
  # frozen and tells the words apart).
  c.text = dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, max_length=12)

  # f=8 VQ tokenizer: 64x64 pixels -> 8x8 tokens. A 4x4 patch stem and two conv levels
  # (f = 4 · 2), l2-normalised 8-dim codes, MSE: on 2 CPU cores, many small steps learn
  # the flat colours and sharp corners faster than fewer large ones.
  c.tokenizer = dict(
    patch_size=4,
    # Narrow levels: the tokenizer is short of steps, not of width. A step of (32, 64) takes
    # 32 ms against 85 for (64, 128), and as many steps reconstruct as well, so it reaches
    # the (64, 128) tokenizer's quality in 90 s instead of 150 and the base gets the
    # difference (fresh single-object images reconstructed right: 93% either way, PSNR 29.1
    # against 28.8 dB; with 150 s, ~4000 steps: 96%, 30.7 dB, but the demo as a whole drew
    # no more right: 376, 312 and 351 of 600 against 343-368). With the 60 s moved to the
    # base, three runs drew 362, 370 and 384 of 600.
    channels=(32, 64),
    num_res_blocks=1,
    latent_channels=32,
    embed_dim=8,
    # 1024 codes reconstruct squares no better (77% judged right against 78%, and 94-99%
    # of circles and triangles either way): the decoder's corners, not the codebook, limit.
    codebook_size=256,
    # Pixel loss, "l2" or "l1". L1 at this learning rate: 18% of squares reconstructed
    # right, against 78% (PSNR 22 against 28).
    loss="l2",
    # ~2300 fit in the time limit on 2 cores (2298, 2319 measured). Trained alone on one
    # H200, the (64, 128) tokenizer reconstructs 54 of 60 squares right with 4000 steps
    # against 43 with 2000.
    steps=2700,
    batch_size=8,
    lr=2e-3,
    time_limit_s=90.0,
  )
  # After the base: the tokenizer's decoder trained again, encoder and codes frozen (paper
  # §2.5), on `pool` training images x `rounds` token grids of which a share (uniform in
  # [min_rate, max_rate]) is masked and re-predicted by the base at `temperature`
  # (demo/refill.py). It draws the base's sampled grids more cleanly than the tokenizer's
  # own decoder.
  c.decoder = dict(
    pool=1024,
    rounds=2,
    min_rate=0.1,
    max_rate=0.8,
    temperature=1.0,
    # Steps count more than batch size here. On one base, single-object images right of
    # 120 (seeds 0, 1): 53, 49 with batch 16 (475 steps in 50 s), 58, 53 with batch 8 (801
    # steps); batch 16 for 100 s (949 steps) gave 64, 57 and for 150 s 65, 63. At batch 8
    # the stage is then saturated: on another base, 62, 63 for 100 s (1527 steps) against
    # 61, 62 for 50 s (871), and learning rates of 1e-3 and 2e-3 did no better.
    steps=1500,  # all run in ~32 s with the narrow tokenizer (~800 of the wider one fit in 50 s)
    batch_size=8,
    lr=5e-4,
    time_limit_s=50.0,
  )
  c.preencode = dict(num_examples=4096, batch_size=256)

  # Base masked transformer over the 8x8 tokens.
  # The demo is compute-bound: 28% / 55% / 64% of single-object prompts come out right with
  # 4 / 12 / 28 minutes of training (benchmarks/demo_ceilings.py tells why). So the base
  # gets what the 10 minutes leave (390 s), and the step is kept cheap: at width 128, an MLP
  # of 256 and 2 heads of 64 take 0.25 s a step, against 0.35 s for 512 and 4 heads of 32
  # (over three seeds, 122/360 single-object images right against 104/360, with 240 s each).
  # With the relative bias and the convolution below (then inside the MLP), an MLP of 512
  # still does no better: 339/600 against 348/600 on one tokenizer (seeds 0-4), in 673
  # steps against 1008.
  # Other levers, replayed on one H200 at the step counts that fit here (single-object
  # images right of 120, seeds 0 and 1, with a 450-step decoder stage of batch 16), before
  # the relative position bias below: 52, 57 as configured; 57, 63 with 1700 base steps; 57,
  # 61 with label smoothing 0.1; 50, 56 with 16384 examples pre-encoded; 51, 60 and 55, 55
  # with 80% and 100% single-object captions. Squares stay at 0-6 of 40 in every one.
  c.base = dict(
    # 64 wide and 3 layers, not 128 and 4: the demo is short of steps, and a smaller base
    # takes more of them in the 390 s and learns more in all (2026-11-27; bases on the
    # tokenizer and data of the second Muon demo, each with a decoder stage; 8 images per
    # seen single-object prompt, seeds 0-4 / 100-104; masked-token NLL): 128 wide, 4 layers
    # (~930 steps) 429 / 418 of 600, 0.84; 3 layers (1424) 438 / 440, 0.79; 2 layers (2043)
    # 430 / 434, 0.81; 96 wide, 3 layers (1877) 460 / 460, 0.76; 64 wide (2324) 457 / 469,
    # 0.75. On the first Muon demo's tokenizer, 3 layers gave 423 / 429 against 420 / 407.
    # Two whole demos with 3 layers of 64: 464 / 461 and 458 / 463 (with the convolutions
    # below on the inputs: 459 / 472 and 452 / 468). With those, 4 layers of 64 (1851 steps)
    # gave 471 / 457 and 0.73 against 487 / 481 and 0.69 for 3.
    # An MLP of 128 (2991 steps) gave 458 / 461 and 0.77: the MLP stays at 256. Nor did
    # 4 heads of 16 (447 / 458, 0.75), batch 32 for twice the steps (462 / 453, 0.77) or
    # 128 for half (442 / 454, 0.77), Muon at 2e-2 (469 / 462, 0.76) or AdaLN from the
    # pooled text (449 / 468, 0.75) do better (docs/demo.md, "The base's size").
    width=64,
    num_layers=3,
    num_heads=2,
    mlp_dim=256,
    # On 2 Intel Xeon cores all 3350 run in ~310 s since XLA's freed temporaries are reused
    # (muse_jax/host_memory.py; 384 s before, 2026-12-07), and the time limit is left as it
    # was for slower CPUs: on the Zen 4 of 2026-11-27, 2600-2750 fit, and the cosine ended at
    # ~10% of the peak rate. A schedule of 4000, which the freed time fits, drew 463 / 473
    # of 600 (seeds 0-4 / 100-104) against 481 / 477 on the same tokenizer and data: no
    # gain. Annealing fully within the time did no better either (with 4 layers of 128 and
    # 330 s, a cosine of 950 steps gave 317/600 at 840 steps; runs of 1250: 343, 368).
    steps=3350,
    batch_size=64,  # 16 x 4 the steps tied (4 x 128); 32 tied, 128 did worse (3 x 64)
    # Muon for the hidden matrices, AdamW for the rest (muse_jax/optim.py). Bases (128 wide,
    # 4 layers) trained 390 s on one tokenizer, judged by their masked-token predictions on
    # 1024 unseen single-object images (half the tokens masked; NLL, and accuracy on the
    # object's tokens): AdamW at 3e-3 (966 steps) 1.19, 46%; Muon at 3e-3 0.96, 57%; 6e-3
    # 0.87, 59%; 1.2e-2 0.83, 63%; 2.4e-2 0.85, 61% (915-943 steps; timed alone, a Muon step
    # costs 13-16% more: its Newton-Schulz products on ~40 small matrices).
    optimizer="muon",
    # AdamW (optimizer="adamw"): 3e-3, measured against 1e-3: 23% of single-object prompts
    # right, against 18%.
    lr=1.2e-2,
    warmup_steps=50,
    # Unrolled layers: a few blocks compile in seconds, and run 14% faster than nn.scan's loop
    # on a CPU (0.40 against 0.46 s a step, with 4 layers of 128 and an MLP of 512).
    scan_layers=False,
    # A learned 2D relative position bias in the self-attention (models/layers.py): what
    # the base learns about neighbouring tokens then holds at every position of the grid.
    # On this CPU, two 330 s bases on one tokenizer: 61, 64 of 120 against 62, 53 without
    # (54, 48 against 49, 44 through the tokenizer's own decoder). Replayed on one H200 on
    # another tokenizer: 66, 64 against 50, 42; with it there, 4 heads of 32 gave 66, 67,
    # 1700 steps 65, 59, learning rates of 2e-3 and 5e-3 59, 58 and 28, 27, and label
    # smoothing 0.1 47, 52. Its gather and scatter cost ~1% of the step.
    relative_position=True,
    # Depthwise 3x3 convolutions over the grid on the inputs of the self-attention and the
    # MLP (models/layers.py, GridConv), for the same reason. Bases replayed 390 s each on one
    # tokenizer (2026-11-27; 8 images per seen single-object prompt, seeds 0-4 / 100-104,
    # squares in brackets; masked-token NLL): the convolution inside the MLP, on its 256
    # hidden channels, as before (2364 steps) 448 / 435 (59 / 44), 0.74; on the MLP's 64
    # input channels instead (2780) 477 / 459 (82 / 72), 0.72; on the self-attention's
    # input too, as here (2611) 487 / 481 (91 / 87), 0.69; on the cross-attention's as well
    # (2623) 467 / 478 (76 / 83), 0.70. Inside the MLP it had lifted 315 of 600 to 370
    # (triangles 119 to 169), at ~20% of the step; the two on the inputs cost half as much.
    local_conv=True,
    time_limit_s=390.0,
  )

  # Sampling and judging.
  c.sampler = dict(
    # Constant guidance 2: measured on one base, 32% of single-object prompts right, against
    # 28% for the paper's linear ramp to 3, 20% for 1, 4% for 6, and 3% without guidance
    # (most images then come out blank: white is every token's likeliest code).
    # 24 steps at temperature 0.5: on one base (120 images each), 63 right, against 48 for
    # 12 steps at temperature 1, 53 for 24 at 1, 56 for 12 at 0.5, 64 for 64 at 0.5 and 58
    # for 12 at 0.25; choice temperature 1 and 4 (55, 60) and guidance 1 and 3 (41, 52) at
    # 24 steps and temperature 0.5 did no better than 2. Replayed on a demo of 2026-11-26
    # (8 images per seen single-object prompt, seeds 0-4; 354/600 as configured): top-k 2
    # gave 352, temperature 0.25 352, argmax 356, choice temperature 0 287, guidance 3 322,
    # 48 steps 342.
    # Mask schedules (2026-11-27; same 600 prompts, each count on one base): cosine 370,
    # 390 (other seeds) and 378 (another run's base); square 390, 369 and 367; cubic 378 and
    # 356; exp 377; linear 344; sqrt 270. So cosine (the paper's) stays: the convex ones tie
    # with it, and the same base's count moves by ~20 between two sets of seeds.
    # Re-measured on two demos with the 64-wide base (2026-11-27; 1846 of 2400 images as
    # configured, seeds 0-4 and 100-104): temperature 0.3 1846, 0.75 1846, 1.0 1818;
    # guidance 1.5 1843, 2.5 1801; choice temperature 1 1853; 16 steps 1786. It stays.
    schedule="cosine",
    # 64 steps, one token each on the 8x8 grid, rather than the paper's 24 for 256 tokens:
    # tokens revealed in one step are drawn independently of each other, and a square's
    # sides are drawn by tokens far apart. On the Intel demo's base of 2026-12-07 (seeds
    # 0-4, 100-104, 200-204, 300-304): 1901 of 2400 right, against 1885 with 48 steps, 1852
    # with 24 and 467 of 600 with 32. At 64 steps the rest holds (seeds 0-4 and 100-104;
    # 958 of 1200 as configured): temperature 0.3 922, 1.0 945; choice temperature 1 951,
    # 4 946; guidance 1.5 952, 3 902. Generation takes twice as long (600 images in 26 s
    # against 13).
    num_steps=64,
    guidance_scale=2.0,
    guidance_schedule="constant",
    temperature=0.5,
    choice_temperature=2.0,
  )
  c.images_per_prompt = 4
  c.count_prompts = 6  # count-form prompts judged (seen pairs), plus one per held-out pair
  c.relation_prompts = 6

  if arg == "tiny":  # about a minute: for the end-to-end test, not for good images
    c.tokenizer.update(channels=(16, 32), latent_channels=8, embed_dim=4, codebook_size=64, steps=30,
                       batch_size=8, time_limit_s=60.0)  # fmt: skip
    c.decoder.update(pool=32, rounds=2, steps=5, batch_size=8, time_limit_s=30.0)
    c.preencode.update(num_examples=256, batch_size=64)
    c.base.update(
      width=32, num_layers=1, num_heads=2, mlp_dim=64, steps=30, batch_size=16, time_limit_s=60.0
    )
    c.sampler.num_steps = 4
    c.images_per_prompt = 1
    c.count_prompts = 1
    c.relation_prompts = 1
  elif arg == "long":
    # The demo is short of base compute, not of anything else: its base (then with the
    # convolution inside the MLPs) given 15 minutes (5445 steps of a schedule of 7000) on
    # the tokenizer and data of a 10-minute run drew 495 and 488 of 600 single-object images
    # right (seeds 0-4 and 100-104; squares 96 and 91 of 200), against 471 and 448 for that
    # run's own 390 s base (2026-11-27). A whole
    # run of this variant: 17.5 minutes, 487 and 495 (before, with the convolution inside
    # the MLPs: 488 and 479; another with seed 1, 510 and 503). With 64 sampler steps and
    # the squares weighted, in an hour when the CPU ran slow (4838 base steps): 521 and 505.
    c.base.update(steps=7000, time_limit_s=900.0)
  elif arg not in (None, ""):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r}; expected '', 'tiny' or 'long'")
  return c
