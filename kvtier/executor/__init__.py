"""The data plane's executor: one rank's storages, engine and disk threads wired once
(``plane.RankDataPlane``), used by ``KvBlockManager`` and the vLLM worker half alike."""
