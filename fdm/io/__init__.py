"""Persistence: every file fdm-vq reads or writes, and where it comes from.

- :mod:`fdm.io.weights`: safetensors weights with a recorded digest, strict loading into a module;
- :mod:`fdm.io.unpickler`: pickled PyTorch checkpoints read by a restricted unpickler (no code runs);
- :mod:`fdm.io.fingerprint`: codebook fingerprints (which base model an FDM belongs to) and JSON digests;
- :mod:`fdm.io.hub`: local path or Hugging Face Hub repo, Hub downloads and model cards;
- :mod:`fdm.io.official`: the FDM weights released with the paper (hyudsl/FDM);
- :mod:`fdm.io.decoder_weights`: the phase-3 fine-tuned decoder saved beside an FDM.

Training checkpoints (resume) live with the trainers (:mod:`fdm.training.checkpointing`), the PUT release's
checkpoint layouts with the PUT family (:mod:`fdm.adapters.put.checkpoints`).
"""
