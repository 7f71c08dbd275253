# The pod the token names, as the inventory sees it now.
package identityd

import rego.v1

pod_ref := concat("", [str(pod, "namespace"), "/", str(pod, "name")])

violations contains "POD_NOT_FOUND: no pod with the token's uid or name" if not pod

violations contains msg if {
	got := str(pod, "uid")
	got != token_pod_uid
	msg := concat("", ["POD_UID_MISMATCH: pod ", pod_ref, " has uid '", got, "', the token names '", token_pod_uid, "'"])
}

violations contains msg if {
	got := str(pod, "name")
	got != token_pod_name
	msg := concat("", ["POD_NAME_MISMATCH: pod is named '", got, "', the token names '", token_pod_name, "'"])
}

violations contains msg if {
	got := str(pod, "namespace")
	got != token_namespace
	msg := concat("", ["POD_NAMESPACE_MISMATCH: pod is in '", got, "', the token names '", token_namespace, "'"])
}

violations contains msg if {
	got := str(pod, "service_account")
	got != token_service_account
	msg := concat("", [
		"POD_SERVICE_ACCOUNT_MISMATCH: pod ", pod_ref, " runs as '", got,
		"', the token names '", token_service_account, "'",
	])
}

violations contains msg if {
	phase := str(pod, "phase")
	phase != "Running"
	msg := concat("", ["POD_NOT_RUNNING: pod ", pod_ref, " is in phase '", phase, "'"])
}

# Absent counts as terminating: fail closed.
violations contains concat("", ["POD_TERMINATING: pod ", pod_ref, " is being deleted"]) if {
	object.get(pod, "terminating", true) != false
}

# A token without a node (null) skips this check; one with a node must match.
violations contains msg if {
	node := tok.node
	is_object(node)
	want := str(node, "name")
	got := str(pod, "node")
	got != want
	msg := concat("", ["NODE_MISMATCH: pod ", pod_ref, " is on '", got, "', the token names '", want, "'"])
}

# Read from input directly: the same answer as through cfg / pod (a section
# that is not an object has no such field), and the grant and fast.rego use
# them on every refresh.
refresh_enabled_by_config if input.config.allow_refresh == true

refresh_disabled_by_pod if input.pod.labels["identityd.io/refresh"] == "false"

violations contains "REFRESH_NOT_ALLOWED: refresh is disabled in the configuration" if {
	input.kind == "refresh"
	not refresh_enabled_by_config
}

violations contains concat("", ["REFRESH_NOT_ALLOWED: pod ", pod_ref, " has label identityd.io/refresh=false"]) if {
	input.kind == "refresh"
	refresh_disabled_by_pod
}
