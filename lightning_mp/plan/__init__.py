"""Deciding the split, as data: layer discovery, measured layer costs, the cost model, the partition, the schedules
(each rank's ordered actions), the schedule choice and the :class:`~lightning_mp.plan.stage_plan.StagePlan`.

Pure functions that tests run without processes. May import ``runtime``."""
