"""Data-plane storage: layouts and the bytes of the device, host and disk tiers."""
