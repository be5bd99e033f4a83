"""CoSAlign: config-conditioned safety alignment (SFT + DPO on synthesized configs)."""
