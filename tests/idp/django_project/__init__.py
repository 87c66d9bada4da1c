"""The Django project behind the test IdP: django-oauth-toolkit plus a few test-only views.

It is imported only inside the IdP's own process (`python -m tests.idp.serve`), never by pytest.
"""
