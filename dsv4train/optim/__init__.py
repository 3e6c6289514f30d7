"""Optimizers (Muon + AdamW, arch ref §8.1) and LR / MTP-weight schedules (§8.2)."""
