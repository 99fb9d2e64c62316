"""The import path of the Celery staging helpers before the Celery integration became a
package; they live in :mod:`jobledger.integrations.celery.staging`."""

from jobledger.integrations.celery.staging import (
    STAGED_OPTIONS,
    SYSTEM,
    signature_parts,
    staged_record,
)

__all__ = ["STAGED_OPTIONS", "SYSTEM", "signature_parts", "staged_record"]
