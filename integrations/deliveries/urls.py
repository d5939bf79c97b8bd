from __future__ import annotations

from django.urls import re_path

from integrations.deliveries import api

urlpatterns = [
    re_path(
        r"^api/v1/sessions/(?P<session_pk>[0-9]{1,18})/deliveries/?$",
        api.SessionDeliveriesViewSet.as_view({"get": "list"}),
        name="api-session-deliveries",
    ),
    re_path(
        r"^api/v1/deliveries/(?P<pk>[0-9]{1,18})/?$",
        api.DeliveryViewSet.as_view({"get": "retrieve"}),
        name="api-delivery-detail",
    ),
    re_path(
        r"^api/v1/deliveries/(?P<pk>[0-9]{1,18})/replay/?$",
        api.DeliveryViewSet.as_view({"post": "replay"}),
        name="api-delivery-replay",
    ),
]
