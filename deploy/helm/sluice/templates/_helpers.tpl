{{- define "sluice.fullname" -}}{{ .Release.Name }}-sluice{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.labels" -}}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* An image reference: repository, then @digest or :tag (default: the appVersion). */}}
{{- define "sluice.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end -}}
{{- end -}}

{{/* Label matchers of this release's series in Prometheus. */}}
{{- define "sluice.seriesSelector" -}}
{{- .Values.monitoring.seriesSelector | default (printf "namespace=%q,app_kubernetes_io_instance=%q" .Release.Namespace .Release.Name) -}}
{{- end -}}

{{/* Requests waiting for a shard group: in the routers' queues and in the groups. Either side
     may have no series (no group yet, with scale to zero): it counts as 0. Takes the selector. */}}
{{- define "sluice.query.waitingRequests" -}}
(sum(sluice_router_queue_size{ {{- . -}} }) or vector(0)) + (sum(sluice_shard_waiting_requests{ {{- . -}} }) or vector(0))
{{- end -}}

{{/* The groups' mean share of KV budget in use, 0..1. Takes the selector. */}}
{{- define "sluice.query.kvBudgetUsage" -}}
avg(sluice_shard_kv_budget_usage_ratio{ {{- . -}} })
{{- end -}}

{{- define "sluice.scaleToZero" -}}
{{- and (eq .Values.shard.autoscaling.backend "keda") .Values.shard.autoscaling.scaleToZero -}}
{{- end -}}

{{/* Go's float formatting of a histogram bound as prometheus_client writes its `le` label. */}}
{{- define "sluice.le" -}}
{{- $bound := float64 . -}}
{{- if eq $bound (floor $bound) }}{{ printf "%.1f" $bound }}{{ else }}{{ printf "%g" $bound }}{{ end -}}
{{- end -}}

{{/* The scale-up and scale-down behaviour shared by the HPA and KEDA's HPA. */}}
{{- define "sluice.shardScalingBehavior" -}}
{{- $a := .Values.shard.autoscaling -}}
scaleUp:
  stabilizationWindowSeconds: {{ $a.scaleUpStabilizationSeconds }}
  selectPolicy: Max
  policies:
    - {type: Percent, value: 100, periodSeconds: 15}
    - {type: Pods, value: 2, periodSeconds: 15}
scaleDown:
  stabilizationWindowSeconds: {{ $a.scaleDownStabilizationSeconds }}
  selectPolicy: Min
  policies:
    - {type: Pods, value: {{ $a.scaleDownGroupsPerPeriod }}, periodSeconds: {{ $a.scaleDownPeriodSeconds }}}
{{- end -}}
