"""Scheduling policies: importing this package registers every policy and router by name."""

from llmsched.engine.plan import pack_in_order  # noqa: F401
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
    policy_class,
    router_class,
)
