"""Lifecycle indications (issue 7): subscriptions in interop, filters in WQL, delivery.

- `subscriptions`: CIM_IndicationFilter, CIM_ListenerDestinationCIMXML and
  CIM_IndicationSubscription instances, created by clients and kept in a JSON file;
- `delivery`: one task and one bounded queue per listener destination, CIM-XML export
  requests with retries;
- `service`: inventory changes -> VIRT_ComputerSystem{Created,Modified,Deleted}Indication
  -> matching subscriptions -> delivery.

Nothing here imports libvirt or D-Bus: server.py hands the inventory feed in.
"""
