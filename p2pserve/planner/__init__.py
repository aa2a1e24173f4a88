"""The planner: choose asymmetric TP x PP plans from the devices a swarm actually has.

``devices`` describes hardware (catalogue, ``--devices`` spec), ``cost`` predicts what a plan
does on it, ``search`` finds the best plan (and the best stage for a joining worker),
``planfile`` reads and writes the plan TOML, ``measure`` benchmarks the local device, and
``cli`` is `p2pserve plan`.
"""

from p2pserve.planner.cost import CostParams, Workload, evaluate_plan
from p2pserve.planner.devices import Device, DeviceType, Group, Link, parse_devices
from p2pserve.planner.measure import DeviceSpeed, measure_device
from p2pserve.planner.planfile import dump_plan_toml, load_plan_toml
from p2pserve.planner.search import ServingStage, SwarmPlan, best_stage_for_new_worker, plan_swarm, split_layers

__all__ = [
    "CostParams", "Device", "DeviceSpeed", "DeviceType", "Group", "Link", "ServingStage", "SwarmPlan",
    "Workload", "best_stage_for_new_worker", "dump_plan_toml", "evaluate_plan", "load_plan_toml",
    "measure_device", "parse_devices", "plan_swarm", "split_layers",
]
