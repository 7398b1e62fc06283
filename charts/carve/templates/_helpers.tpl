{{/* The labels every carve object carries; the argument is its component. */}}
{{- define "carve.labels" -}}
app.kubernetes.io/name: {{ . }}
app.kubernetes.io/part-of: carve
{{- end }}

{{- define "carve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default (printf "v%s" .Chart.AppVersion) }}
{{- end }}

{{/* Both pods read the API endpoint ConfigMap when it exists. */}}
{{- define "carve.apiEndpointEnvFrom" -}}
# Clusters without kube-proxy (or before it runs): the optional ConfigMap
# carve-api-endpoint names the API server itself (values apiEndpoint, README).
envFrom:
  - configMapRef:
      name: carve-api-endpoint
      optional: true
{{- end }}

{{/* CARVE_ROLE, only when it is not the default (dataplane). */}}
{{- define "carve.agentRole" -}}
{{- if ne .Values.agent.role "dataplane" }}
- name: CARVE_ROLE
  value: {{ .Values.agent.role | quote }}
{{- end }}
{{- end }}
