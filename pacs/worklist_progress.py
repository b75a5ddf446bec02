"""The worklist progress worker: scheduled steps of modalities that send no
MPPS are moved by their images (see
:meth:`pacs.orders.OrderService.progress_from_images`): IN PROGRESS once a
study linked to the order has images for them, COMPLETED once its studies
have been stable for ``worklist_images_stable_seconds``, and the HIS told as
an MPPS would have told it. Each node runs one; every procedure is moved
under its lock and read again there, so two nodes never move one twice."""

from __future__ import annotations

import logging

from .app import Pacs
from .orders import OrderService
from .periodic import Periodic
from .timezones import hospital_zone

log = logging.getLogger(__name__)

# Seconds between rounds at most: the first image of an exam starts its step
# (and the HIS hears IP) within this; a short stable time checks more often.
MAX_INTERVAL = 30.0


class WorklistProgress(Periodic):
    """Moves steps by their images every few seconds."""

    thread_name = "worklist-progress"

    def __init__(self, pacs: Pacs) -> None:
        self.stable_seconds = float(pacs.settings.worklist_images_stable_seconds)
        super().__init__(min(MAX_INTERVAL, max(1.0, self.stable_seconds / 4)))
        self.service = OrderService(pacs.engine, hospital_zone(pacs.settings),
                                    order_status=pacs.settings.his_order_status)

    def round(self) -> None:
        self.service.progress_from_images(self.stable_seconds)
