"""kvtier's control plane for the tiers below the GPU: what lives where across G2 and G3.

Why a package of its own: the vLLM scheduler half and the library both decide the same things
(prefix match across tiers, two-phase stores and loads, the G2 -> G3 cascade, restore of the
persistent tier) on plain data (sequence hashes, slot ids, parents), in a process that must not
import torch. ``slots`` indexes one tier, ``loads`` holds the loads in flight, ``restore`` rebuilds
G3's index at start-up, ``planner`` (``TierPlanner``) is the one place those decisions are made.
"""
