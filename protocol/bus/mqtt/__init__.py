"""The MQTT v5 bus (paho-mqtt driven from trio, no paho thread); must not import nats or tiers.

``open_mqtt_bus(MqttConfig(...))`` yields an ``MqttBus`` that speaks MQTT v5 at
QoS 1. The rules the code follows, each one forced by a measured paho or
Mosquitto behaviour described in ``docs/transport.md``, section "MQTT: paho-mqtt
under trio, and Mosquitto":

* External loop: trio tasks read, write, tick keepalive and reconnect; paho
  callbacks only record into plain state (``_connection``).
* Two connections per bus: publishes over ``<client_id>.pub``, subscriptions
  over the persistent session ``<client_id>``, so a full subscription cannot
  hold back this bus's own PUBACKs (``_publish``, ``_subscription``). A device
  uses one (``MqttConfig(single_connection=True)``, ``_single``) on a broker
  that binds the client id to its certificate; that link never parks its
  reader while a PUBACK or SUBACK is awaited.
* The session always connects with ``clean_start=False``.
* Durable subscriptions are shared (``$share/<durable>/<filter>``) unless
  ``MqttConfig(shared_durables=False)``, and are subscribed again at every
  reconnect.
* Subscription identifiers route each message to exactly one subscription;
  messages for a durable that is not open yet are held until it is.
* Backpressure: the reader parks while a subscription is at capacity or
  ``receive_maximum`` messages are held; keep ``keepalive_s`` above the longest
  consumer stall.
* Acks carry their connection generation; a stale one is dropped and the
  broker redelivers (``redelivered=True``).
* ``publish`` waits for its PUBACK; a lost connection raises ``PublishError``
  and nothing is resent: the caller retries with the same ``msg_id`` (user
  property ``ft-msg-id``; MQTT has no dedupe).
"""

from fedtier.protocol.bus.mqtt._bus import MqttBus, MqttBusStats, open_mqtt_bus
from fedtier.protocol.bus.mqtt._config import MqttConfig
from fedtier.protocol.bus.mqtt._wire import MSG_ID_PROPERTY

__all__ = ["MSG_ID_PROPERTY", "MqttBus", "MqttBusStats", "MqttConfig", "open_mqtt_bus"]
