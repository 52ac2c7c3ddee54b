"""Ray start-up for the CLI; the implementation lives in `jobs.runtime` (jobs run it too)."""

from jobs.runtime import LOOPBACK, local_ray, ray_init_kwargs

__all__ = ["LOOPBACK", "local_ray", "ray_init_kwargs"]
