from __future__ import annotations

from django.db import models


class Order(models.Model):
    id = models.CharField(max_length=64, primary_key=True)
    note = models.CharField(max_length=200, default="")

    class Meta:
        app_label = "shop"
