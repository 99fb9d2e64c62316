"""Settings of the test Django project (see ``django_project.setup``)."""

from __future__ import annotations

import json
import os

import pymysql

from django_project import DATABASES_ENV, django_database

# Django's MySQL backend imports MySQLdb (mysqlclient); PyMySQL stands in for it, as in many
# projects, so the tests need no C client library.
pymysql.install_as_MySQLdb()

SECRET_KEY = "jobledger-tests"
USE_TZ = True
INSTALLED_APPS = ["jobledger.contrib.django", "django_project.shop"]
DATABASES = {
    alias: django_database(url) for alias, url in json.loads(os.environ[DATABASES_ENV]).items()
}
