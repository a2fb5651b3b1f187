"""paho-mqtt 5.0 against canal: a subscriber on one node, a publisher with user properties on
another; exits 0 when the message arrives with its user properties, 1 otherwise.

    python3 paho_v5.py HOST SUB_PORT PUB_PORT
"""

import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, sub_port, pub_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# The node's token is the MQTT password (the user name is not looked at).
token = sys.argv[4] if len(sys.argv) > 4 else None
topic = "smoke/paho"
subscribed = threading.Event()
got = {}
done = threading.Event()


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.set()


def on_message(client, userdata, msg):
    props = getattr(msg.properties, "UserProperty", None) or []
    got["payload"] = msg.payload.decode()
    got["props"] = list(props)
    done.set()


sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-sub", protocol=mqtt.MQTTv5)
sub.on_subscribe = on_subscribe
sub.on_message = on_message
if token:
    sub.username_pw_set("canal", token)
sub.connect(host, sub_port)
sub.loop_start()
sub.subscribe(topic, qos=1)
if not subscribed.wait(20):
    print("paho: no SUBACK", file=sys.stderr)
    sys.exit(1)

pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=mqtt.MQTTv5)
if token:
    pub.username_pw_set("canal", token)
pub.connect(host, pub_port)
pub.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = [("unit", "celsius"), ("room", "1")]
deadline = time.time() + 30
while not done.is_set() and time.time() < deadline:
    pub.publish(topic, "19.5", qos=1, properties=props).wait_for_publish(10)
    done.wait(1)
pub.loop_stop()
sub.loop_stop()
if not done.is_set():
    print("paho: nothing arrived", file=sys.stderr)
    sys.exit(1)
want = {("unit", "celsius"), ("room", "1")}
if got["payload"] != "19.5" or not want <= set(map(tuple, got["props"])):
    print(f"paho: got {got}", file=sys.stderr)
    sys.exit(1)
print(f"paho: got {got['payload']} with {got['props']}")
