# The decision document (policies/README.md): what identityd evaluates.
#
# `reasons` is the partial set of deny reasons; the decision allows exactly
# when it is empty and the grant below could be computed. The default checks
# add their reasons to `violations`, which is only evaluated when the one-pass
# check `fast_allow` (fast.rego) cannot vouch that none of them fires: on a
# legitimate request that saves evaluating every check one by one. A module
# may still add to `reasons` directly; those rules always run.
package identityd

import rego.v1

decision := {"allow": true, "reasons": [], "attributes": attributes} if {
	count(reasons) == 0
	attributes := granted
} else := {"allow": false, "reasons": sort(reasons), "attributes": {}}

reasons contains reason if {
	not fast_allow
	some reason in violations
}

# The attributes the CA reads on allow. Only evaluated when `reasons` is empty,
# and so on a valid input (the default checks deny any other), which the rules
# below rely on: they read input directly, without the always-defined section
# rules, because they run on every allow.
granted := {
	"certExpiryTime": format_int(minutes, 10),
	"certRefresh": cert_refresh,
	"certUsage": usage,
} if {
	minutes := cert_expiry_minutes
	is_number(minutes)
	usage := input.config.cert_usage
	is_string(usage)
}

# The configured lifetime, or a shorter one a pod asks for with the annotation
# identityd.io/cert-expiry-minutes (never a longer one).
cert_expiry_minutes := pod_expiry_minutes if {
	pod_expiry_minutes < input.config.cert_expiry_minutes
} else := input.config.cert_expiry_minutes

pod_expiry_minutes := to_number(text) if {
	text := input.pod.annotations["identityd.io/cert-expiry-minutes"]
	is_string(text)
	regex.match(`^[1-9][0-9]{0,5}$`, text)
}

default cert_refresh := "false"

cert_refresh := "true" if {
	input.config.allow_refresh == true
	not refresh_disabled_by_pod
}
