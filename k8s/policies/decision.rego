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

decision := {
	"allow": allow,
	"reasons": sort([reason | some reason in reasons]),
	"attributes": granted,
}

reasons contains reason if {
	not fast_allow
	some reason in violations
}

default allow := false

allow if {
	count(reasons) == 0
	count(granted) > 0
}

default granted := {}

granted := {
	"certExpiryTime": format_int(cert_expiry_minutes, 10),
	"certRefresh": cert_refresh,
	"certUsage": str(cfg, "cert_usage"),
} if {
	count(reasons) == 0
	is_number(cert_expiry_minutes)
}

# The configured lifetime, or a shorter one a pod asks for with the annotation
# identityd.io/cert-expiry-minutes (never a longer one).
cert_expiry_minutes := pod_expiry_minutes if {
	pod_expiry_minutes < cfg.cert_expiry_minutes
} else := cfg.cert_expiry_minutes

pod_expiry_minutes := to_number(text) if {
	text := pod.annotations["identityd.io/cert-expiry-minutes"]
	is_string(text)
	regex.match(`^[1-9][0-9]{0,5}$`, text)
}

default cert_refresh := "false"

cert_refresh := "true" if refresh_allowed
