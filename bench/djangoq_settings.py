"""The project's settings for bench/djangoq.py's cluster, keeping every task's result: django-q2
keeps only the last `save_limit` (250 by default) successful tasks, so a burst of more could
never be counted to its end."""

from picobot_site.settings import *  # noqa: F403
from picobot_site.settings import Q_CLUSTER

Q_CLUSTER = {**Q_CLUSTER, "save_limit": 0}
