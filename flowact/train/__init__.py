"""Training on procedurally generated talking heads: data, stages, distillation, quality metrics.

Stages (one command each; recipe and costs in flowact/train/README.md):
    python -m flowact.train.vae         --preset tiny   # VAE: frames <-> latents
    python -m flowact.train.forcing     --preset tiny   # MMDiT, chunkwise diffusion forcing (ground-truth memory)
    python -m flowact.train.forcing     --preset tiny --self-forcing   # fine-tune with generated memory
    python -m flowact.train.distill     --preset tiny   # many-step teacher -> 3-NFE student
    python -m flowact.train.ship        --preset tiny   # fp16 checkpoint under checkpoints/

Nothing here is imported by the serving path; it only reads the model code and the engine.
"""
