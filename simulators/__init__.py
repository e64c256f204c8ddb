"""Simulated devices, fleets and benchmarks that drive a real enrollment service.

Map (each module imports only those above it in its row or in rows above; no cycles):

- processes        child processes in their own group, stopped as a group, never left
- swtpm, abrmd     a software TPM; tpm2-abrmd on a private D-Bus (a resource manager)
- manufacturer, swtpm_localca   EK certificates: a simulated vendor, swtpm's own tooling
- device           swtpm + provisioning + tpm2-abrmd: a device's TPM
- served, broker   a served instance (init + serve); Mosquitto, broker-config + relay
- operator_api, deployment      a deployment seen from outside (operator API, OCSP)
- netfault         a TCP relay that cuts one connection mid-upload
- bench_report, bench_rig       percentiles, /proc CPU; the one client-process pool
- bench, bench_attest(_report), bench_revoke, bench_revocation   the benchmarks
- fleet_devices, fleet_notices, fleet_rig   one device's life; revocation at the device;
  the private fleet's processes and gateway
- fleet_options, fleet_steps, fleet_report, fleet_junit, fleet_plot   a fleet run's parts
- fleet_local, fleet_remote, fleet_load, fleet   the three runs and the entry point
- demo, demo_fleet                `make demo`
- cli_common, cli_bench, cli_fleet, cli   `enroll-sim` (the root imports the others)

The pytest plugin ``tpm_enroll_testing`` (a sibling package) builds its fixtures from
served, broker, manufacturer, device and operator_api.
"""
