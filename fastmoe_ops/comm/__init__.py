"""Communication: a thin `Group` over an mpi4py communicator (bootstrap collectives and the
host transport), every blocking exchange bounded by FMO_COMM_TIMEOUT."""
from .group import Group  # noqa: F401
