"""Scheduling policies: importing this package registers every policy and router by name."""

from llmsched.policies import (  # noqa: F401
    continuum,
    oracle,
    pars,
    pascal,
    rad,
    round_robin,
    routing,
    sarathi,
    slai,
    vllm,
)
from llmsched.policies.base import (  # noqa: F401
    INSTANCE_POLICIES,
    ROUTERS,
    InstancePolicy,
    Router,
    pack_in_order,
    policy_class,
    router_class,
)
